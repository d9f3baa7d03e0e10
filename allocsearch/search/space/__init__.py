"""Search spaces: the YAML files and the ``SearchSpace`` (``space``), one dimension and its per-layer forms
(``dims``), each method's part of a space (``methods``) and what a space needs of its model (``models``)."""
