"""Run under `torchrun --nproc_per_node 2 tests/zero_check.py <launch/deepspeed/zeroN.json> <digits dir> <out dir>`
(or the `deepspeed` launcher, which appends --local_rank=N).

Builds distrain's DeepSpeed model from the launch/ JSON, trains a few steps on digits, and writes per rank:
- whether DeepSpeed really partitions (engine stage, this rank's share of parameters / optimizer state);
- the engine's own logits on a fixed batch vs a plain timm model loaded with the consolidated fp32
  state dict (and vs DeepSpeed's own zero_to_fp32 consolidation of an engine checkpoint);
- resumability: logits after 2 more steps, and after reloading the engine checkpoint and redoing them.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from distrain.config import OptimConfig, TrainConfig
from distrain.data.index import read_index
from distrain.data.loaders import eval_decoder, train_loader
from distrain.data.transforms import ImageTransform
from distrain.distributed import runtime
from distrain.distributed.wrap import wrap
from distrain.training.models import create_model
from distrain.training.optim import create_optimizer

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
ds_json, digits, out = args[0], Path(args[1]), Path(args[2])
precision = args[3] if len(args) > 3 else "no"
compile_backend = args[4] if len(args) > 4 else ""  # "" = no torch.compile
# 32 px, not 16: at 16 px test_resnet's last stage sees 1x1 feature maps, where oneDNN's bf16 convolution
# backward (3x3, stride 2) returns non-finite weight gradients on some Xeons (seen on an AMX-capable one).
SIZE = 32
TRANSFORM = ImageTransform(SIZE, 1)  # bilinear, no crop, [-1, 1]: as before data configs existed
train = TrainConfig(
    batch_size=16,
    grad_accum_steps=2,
    max_grad_norm=1.0,
    deepspeed=ds_json,
    progress=False,
    precision=precision,
    compile=bool(compile_backend),
    compile_backend=compile_backend or "inductor",
)
acc = runtime.create_accelerator(train)
index = read_index(digits)
torch.manual_seed(0)
model = create_model("test_resnet", num_classes=10, in_chans=1)
n_params = sum(p.numel() for p in model.parameters())
optimizer = create_optimizer(model, OptimConfig(lr=1e-2))
trainable = wrap(acc, model, optimizer, train, grad_checkpointing=True)  # timm's + the stem segment
engine = trainable.engine
criterion = torch.nn.CrossEntropyLoss()
batches = iter(
    train_loader(
        index.urls("cv"),
        index.labels_of("cv"),
        batch_size=16,
        shuffle_buffer=100,
        seed=0,
        decode=eval_decoder(TRANSFORM),
        num_workers=0,
    )
)


def step(n):
    norms = []
    for _ in range(n):
        images, labels, _ = next(batches)
        _, _, r = trainable.micro_step(TRANSFORM.normalise(images), labels, criterion)
        if r.boundary:
            norms.append(float(r.grad_norm))
    return norms


torch.manual_seed(1 + acc.process_index)
norms = step(6)  # 3 optimizer steps of 2 micro-batches
fixed = torch.linspace(-1, 1, 8 * SIZE * SIZE).reshape(8, 1, SIZE, SIZE)  # the same batch on every rank


@torch.no_grad()
def engine_logits():
    engine.eval()  # every rank runs the same forward (ZeRO-3 gathers parameters collectively)
    logits = engine(fixed.to(trainable.input_dtype)).float()
    engine.train()
    return logits


state = trainable.full_state_dict()  # also gives every rank rank 0's BatchNorm statistics, as DDP does
logits_engine = engine_logits()
plain = create_model("test_resnet", num_classes=10, in_chans=1)
plain.load_state_dict(state)  # strict: every key of a plain timm model, nothing else
plain.eval()
with torch.no_grad():
    logits_plain = plain(fixed)

ckpt = out / "engine"
tag_info = trainable.save(ckpt, "t0")
acc.wait_for_everyone()
row = {
    "rank": acc.process_index,
    "input_dtype": str(trainable.input_dtype),
    "buffer_dtypes": sorted({str(v.dtype) for k, v in state.items() if k not in dict(plain.named_parameters())}),
    "world": acc.num_processes,
    "stage": engine.zero_optimization_stage(),
    "engine": type(engine).__name__,
    "compiled": engine.is_compiled,
    "n_params": n_params,
    "grad_norms": norms,
    "max_abs_diff_plain_vs_engine": float((logits_plain - logits_engine).abs().max()),
    "logit_scale": float(logits_engine.abs().max()),
}
if acc.is_main_process:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="t0")
    row["zero_to_fp32_max_diff"] = max(float((ds_state[k].float() - state[k].float()).abs().max()) for k in ds_state)
    row["zero_to_fp32_unknown_keys"] = sorted(set(ds_state) - set(state))
    row["zero_to_fp32_params_covered"] = {n for n, _ in plain.named_parameters()} <= set(ds_state)
# This rank's share: ZeRO-3 partitions parameters, ZeRO-1/2 the fp32 master weights in the optimizer.
if row["stage"] == 3:
    row["local_param_elems"] = sum(p.ds_tensor.numel() for p in trainable.single.parameters())
else:
    opt = engine.optimizer
    row["local_param_elems"] = sum(t.numel() for t in opt.single_partition_of_fp32_groups)

# Resume: 2 more steps from the checkpoint, twice.
saved_batches = [next(batches) for _ in range(4)]


def replay():
    for images, labels, _ in saved_batches:
        trainable.micro_step(TRANSFORM.normalise(images), labels, criterion)
    return engine_logits()


after_a = replay()
trainable.load(ckpt, tag_info)
after_b = replay()
row["resume_max_diff"] = float((after_a - after_b).abs().max())
row["moved_since_ckpt"] = float((after_a - logits_engine).abs().max())
row["loss_fixed"] = float(F.cross_entropy(after_a, torch.zeros(8, dtype=torch.long)))
(out / f"rank{acc.process_index}.json").write_text(json.dumps(row))
acc.end_training()  # destroy the process group before exit, as run.py does (see ddp_gather_check.py)
