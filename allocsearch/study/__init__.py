"""The study folder as every reader sees it: its files and names (``folder``), the spend ledger (``ledger``), one
record per trial with its state and the one "best" (``records``), the Optuna storage behind one adapter
(``storage``) and how sure a winner is (``confidence``). Torch- and Ray-free."""
