"""What an allocation is, torch-free: the allocation config (``config``), the method registry (``methods``),
MoLA's layer-wise shapes (``shapes``), what is known of a model before it loads (``model_info``) and config values
as users write them (``values``). Everything above reads these; they import nothing of allocsearch but ``errors``
and ``fileio``."""
