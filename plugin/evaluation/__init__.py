"""The evaluation library behind scripts/eval.py (and the benchmarks and tests that share it):

configs  the evaluated configurations: fastgen, its ablations, baselines at equal bytes
child    measuring jobs in a child process that never imports torch
worker   that child: python -m llama_fastgen.evaluation.worker JOB.json
measure  quality (KL / top-1 / perplexity against the full cache), retrieval, KV bytes, CPU speed
tasks    the retrieval tasks and their held-out haystack
report   plots, markdown tables for docs/RESULTS.md, machine and commit of a run
"""
