"""The ways a worker steps its model, behind one interface (`base.Engine`): plain DDP, DeepSpeed
ZeRO (stage 0-3) and FSDP2 (`fully_shard`). The loop, the checkpoint and the export speak only to
`Engine`; `registry.engine_class` is the one place that maps a spec's `strategy.kind` to an engine.
"""
