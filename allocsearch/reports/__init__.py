"""Read-only views of a study folder: what ``status`` and the dashboard show (``status``), one trial
(``trial``), what the search learnt (``insight``) and a trial exported for production training (``export``)."""
