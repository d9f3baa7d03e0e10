"""The system tests (``make reliability``). A package so that its modules import as ``system.*``: its
conftest.py must not take the name ``conftest``, which tests/conftest.py holds (test_bad_inputs.py imports
``run_cli`` from it)."""
