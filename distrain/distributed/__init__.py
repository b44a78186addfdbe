"""Processes, devices and wrappers: the accelerator and collectives (`runtime`), the `Trainable`
interface (`base`) with its DDP (`ddp`) and DeepSpeed ZeRO (`zero`) implementations, and the one
place that applies them (`wrap`). Only this package imports accelerate or deepspeed."""
