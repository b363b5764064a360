"""A rank's model: where its files are, the meta build, the methods (freeze, LoRA, prompt tuning,
QLoRA), per-block rewrites, the weights loaded shard by shard, and the offline tiny model."""
