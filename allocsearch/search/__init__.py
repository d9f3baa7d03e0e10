"""The search: the controller (``controller``) with its bookkeeping (``bookkeeping``), budget and cost model
(``budget``), confirmation phase (``confirmation``), early stopping (``rungs``), samplers (``samplers``), the
worker's report (``report``) and one ``start`` (``session``); the space in ``space/``, Ray in ``ray/``."""
