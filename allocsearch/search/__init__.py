"""The search: budget, ledger, cost model, study, executor and controller."""
