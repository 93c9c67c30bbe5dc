"""Pretraining data preparation on datatrove: `python -m lm.prepare`.

Reads documents (any data.source form, lm/sources.py), identifies their language, filters them by
the Gopher and C4 rules, scrubs PII, removes exact and near duplicates (MinHash + LSH) and
documents that share long n-grams with evaluation data, and writes the rest per language, with
an audit of every decision: OUT/decisions.jsonl (one line per input document), OUT/report.json
and OUT/report.png. Last, it tokenizes the kept documents into ArrayRecord shards that training
reads with data.source='prepared:OUT' (lm/prepare/shards.py). lm/prepare/pipeline.py lists the
passes; configs/prepare/default.py every option.
"""
