"""MLflow tracking of a study: the tracker that subscribes to the controller's events (``tracker``), its operation
queue (``queue``) and what the runs hold, as pure functions of the study folder (``data``)."""
