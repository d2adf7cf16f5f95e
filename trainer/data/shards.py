"""The pretraining data API: token shards of one split, the stateful window loader, and the tokenizer check.

    shards = TokenShards("data/demo/train")
    check_tokenizer_matches(shards, "tokenizers/demo", model_vocab_size=cfg.vocab_size)
    loader = PretrainLoader(shards, batch_size=8, seq_len=256, seed=0, rank=r, world_size=w)
"""
from trainer.data.pretrain_loader import PretrainLoader
from trainer.data.token_shards import TokenShards, check_tokenizer_matches

__all__ = ["TokenShards", "PretrainLoader", "check_tokenizer_matches"]
