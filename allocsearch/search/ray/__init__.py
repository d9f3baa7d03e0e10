"""The live executor: Ray Tune runs the trials (``executor``), one trial inside a Ray worker (``worker``), what
the cluster's nodes have (``nodes``), and SIGINT / SIGTERM while a search runs (``interrupts``). Nothing else in
allocsearch imports Ray."""
