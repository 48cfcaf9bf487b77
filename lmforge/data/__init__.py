"""Reading, cleaning, deduplicating and splitting documents; the stdlib-docs corpus."""
