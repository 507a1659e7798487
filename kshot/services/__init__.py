"""Services the layers above call, which call nothing above themselves: atomic files and locks
(``files``), checkpoints (``checkpoint``), process groups (``distributed``), plots (``plots``)."""
