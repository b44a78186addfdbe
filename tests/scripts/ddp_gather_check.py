"""Run under `accelerate launch --multi_gpu --num_processes 2`: each rank predicts its own shards of an
uneven split; the gathered predictions must cover every sample exactly once, identically on both ranks."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from distrain.data.index import read_index
from distrain.data.loaders import eval_loader
from distrain.data.transforms import ImageTransform, TestTimeAugment
from distrain.distributed import runtime
from distrain.tasks import get_task
from distrain.training.evaluate import predict
from distrain.training.models import create_model

index = read_index(Path(sys.argv[1]))
acc = Accelerator(cpu=True)
labels = index.labels_of("cv")
keep = {s: labels[s] for s in index.split_ids("cv")[::7]}  # an odd count: divides by neither 2 ranks nor the batch
torch.manual_seed(0)
model = create_model("test_resnet", num_classes=10, in_chans=1)
transform = ImageTransform(16, 1)
pred = predict(model, acc, eval_loader(index.urls("cv"), keep, batch_size=13, transform=transform, num_workers=0),
               transform, TestTimeAugment(), get_task("multiclass").activate)  # fmt: skip
local = len(list(runtime.gather_rows(acc, [acc.process_index])))
total = runtime.sum_across_ranks(acc, [1.0])[0]
digest = hashlib.sha256("\n".join(pred.sample_ids).encode() + pred.probs.tobytes()).hexdigest()
# one file per rank: lines printed by two processes into one pipe can interleave
(Path(sys.argv[2]) / f"rank{acc.process_index}.json").write_text(
    json.dumps(
        {
            "rank": acc.process_index,
            "world": acc.num_processes,
            "rows": len(pred.sample_ids),
            "distinct": len(set(pred.sample_ids)),
            "expected": len(keep),
            "covers": set(pred.sample_ids) == set(keep),
            "digest": digest,
            "gathered_ranks": local,
            "sum": total,
        }
    )
)
# Tear the process group down before exit, as run.py does: left to interpreter shutdown, gloo's threads
# can be destroyed while still running ("terminate called without an active exception", SIGABRT).
acc.end_training()
