"""Synthetic alignment data: Magpie instructions and answers, K models' answers scored into preference pairs.

    template.py     the pre-query (user-turn) prefix a chat template implies, for Magpie
    engine.py       load a chat model and complete prompts in batches, reproducibly per item
    resumable.py    chunked JSONL output with a state file beside it: resume, refuse mixed settings
    dedup.py        exact and near-duplicate instructions (word-bigram Jaccard)
    magpie.py       `launch/synthesize.py magpie`
    preferences.py  `launch/synthesize.py preferences`
"""
