"""One trial: load a model (``models``), encode its data (``encode``), train it (``loop``), evaluate and score it
(``evaluate``, ``scoring``), measure its memory (``memory``), and the whole run from a trial config to a
``TrialResult`` (``trial``). Torch loads only inside these modules' functions that need it."""
