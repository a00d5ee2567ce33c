"""nanoR1 data: the embedded tiny task, JSONL helpers, and prepare scripts for real datasets."""
