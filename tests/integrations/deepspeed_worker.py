"""One rank of the DeepSpeed lane (tests/integrations/test_deepspeed_lane.py starts two with torchrun):

    torchrun --nproc_per_node 2 tests/integrations/deepspeed_worker.py --host llava_next --stage 3 --out OUT

on CPU (gloo), with a tiny random host saved to OUT/plain first. Rank 0 writes OUT/report.json (numbers
and flags the test asserts) and OUT/ref.safetensors (the trained weights, gathered); the folders the
engine saved (16-bit model, zero_to_fp32 output, adapter, the Trainer's model) are reloaded by the test,
in a process without DeepSpeed.

- engine: the plain host and the host with ``dualview.apply(init="identity")`` + ``freeze("warm_start")``
  under ``deepspeed.initialize`` (torch's AdamW): the step-0 losses, then two steps.
- saves: ``save_16bit_model``, ``save_checkpoint`` + ``zero_to_fp32``, ``dualview.save_adapter`` of the
  engine's module.
- zero_init: ``dualview.from_pretrained`` and ``dualview.load`` while an ``HfDeepSpeedConfig`` is alive
  (ZeRO-3: the host is built inside ``deepspeed.zero.Init``).
- trainer: transformers' Trainer with a LLaVA-style config dict ("auto" values) and ``freeze("stage1")``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: tests.* and dualview

import importlib  # noqa: E402

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dualview  # noqa: E402
from dualview.lifecycle import dual_view_modules  # noqa: E402

# DeepSpeed's first init_distributed JIT-compiles a shared-memory all-reduce op with g++ (~45 s on 2
# cores); gloo does every collective here without it
# (deepspeed.comm.torch as an attribute is the torch package: the module is taken from importlib)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

MICRO_BATCH = 2
LR = 1e-2


# ---- the two hosts: a tiny model, its prepared processor, a batch per rank ---------------------------


class LlavaNext:
    def __init__(self):
        from tests import llava_next_models as M

        self.M = M
        self.cls = __import__("transformers").LlavaNextForConditionalGeneration
        self.processor = M.tiny_processor()
        self.image_token_id = M.IMAGE_TOKEN_ID

    def model(self):
        return self.M.tiny_model(seed=0)

    def batch(self, sizes):
        return dict(self.M.batch(sizes, self.processor))

    @staticmethod
    def plain_inputs(batch):
        return batch


class InternVL:
    def __init__(self):
        from dualview.adapters import hf_internvl
        from tests import internvl_models as M

        self.M = M
        self.cls = __import__("transformers").InternVLForConditionalGeneration
        self.processor = hf_internvl.prepare_processor(M.tiny_processor(), M.config_model())
        self.image_token_id = M.IMAGE_TOKEN_ID

    def model(self):
        return self.M.tiny_model(seed=0)

    def batch(self, sizes):
        return dict(self.M.batch(self.processor, sizes))

    @staticmethod
    def plain_inputs(batch):  # the plain host takes no image_sizes
        return {k: v for k, v in batch.items() if k != "image_sizes"}


HOSTS = {"llava_next": LlavaNext, "internvl": InternVL}
# per rank its own images, of different grid mixes: rank 0 two grids (LLaVA-NeXT 2x2 and 2x1, InternVL 2x3
# and 2x1), rank 1 one (LLaVA-NeXT 2x2, InternVL 2x3). The DEM and the gate run once per grid, and ZeRO-3
# gathers their weights at every call: the engines make every rank call them for the union of the grids
# (dualview._zero3.grid_order), and the same sizes under ZeRO-2 give the losses ZeRO-3 must match.
SIZES = {0: [(40, 60), (60, 30)], 1: [(44, 62), (42, 61)]}
# the tower's crops per call: the ranks' crop counts then need different numbers of tower calls (LLaVA-NeXT
# 8 and 10 patches, 6 and 8 global crops), a gather each under ZeRO-3 (kept in step by DualViewEncoder.run_tower)
TOWER_BATCH = 3


def labelled(batch, image_token_id):
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_token_id, -100)
    return {**batch, "labels": labels.masked_fill(batch["attention_mask"] == 0, -100)}


# ---- DeepSpeed configs ----------------------------------------------------------------------------


def engine_config(stage):
    """What deepspeed.initialize gets: every parameter partitioned under ZeRO-3 (persistence threshold
    0: the tiny model's parameters would all stay whole under the default), CPU, fp32, torch's AdamW."""
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def llava_config(stage):
    """The LLaVA forks' scripts/zero2.json / zero3.json ("auto": filled in by the Trainer), plus what CPU
    training with torch's AdamW needs (DeepSpeed would otherwise swap in its compiled CPU Adam)."""
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True)
    return {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": zero,
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}


# ---- helpers --------------------------------------------------------------------------------------


def gathered(module):
    """name -> a full copy of every parameter of ``module`` (gathered from the ZeRO-3 partitions)."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: p.detach().clone() for k, p in params.items()}


def dual_view_names(model):
    """Parameter names of the DEM and the gate, as ``model.named_parameters()`` gives them."""
    ids = {id(p) for m in dual_view_modules(model) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def part_of(name):
    if "spatial_embed" in name or "spatial_gate" in name:
        return "dual_view"
    if "vision" in name:
        return "vision_tower"
    if "projector" in name:
        return "projector"
    return "llm"


def max_change(before, after):
    """part (dual_view, vision_tower, projector, llm) -> the largest |after - before| of its parameters."""
    out = {}
    for name, value in before.items():
        part = part_of(name)
        out[part] = max(out.get(part, 0.0), float((after[name] - value).abs().max()))
    return out


def on_all_ranks(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def forward_engine(model, config):
    """An engine to compute losses with (ZeRO-2 wants an optimizer, which no step here uses)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def loss_of(engine, batch):
    return engine(**batch).loss


# ---- the checks -------------------------------------------------------------------------------------


def check_engine(host, stage, out, report):
    """Check 1 (engine) and 3 (saves)."""
    rank = dist.get_rank()
    batch = labelled(host.batch(SIZES[rank]), host.image_token_id)
    config = engine_config(stage)

    plain = forward_engine(host.model(), config)
    with torch.no_grad():
        plain_loss = float(loss_of(plain, host.plain_inputs(batch)))
    del plain

    torch.manual_seed(1)  # the new DEM: the same on every rank
    model = dualview.freeze(dualview.apply(host.model(), init="identity", tower_batch_size=TOWER_BATCH), "warm_start")
    counts = dualview.trainable_parameters(model, print_fn=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    before = gathered(engine.module)
    local_sizes = {name: p.numel() for name, p in engine.module.named_parameters()}
    counts_in_engine = dualview.trainable_parameters(engine.module, print_fn=None)
    losses, dem_calls = [], []
    (dem,) = [m for name, m in engine.module.named_modules() if name.endswith("spatial_embed")]
    hook = dem.register_forward_hook(lambda m, args, out: dem_calls.append(
        [list(args[2]), args[0].shape[0], bool((args[0] == 0).all())]))  # grid, batch, a dummy of zeros
    # the tower's patch convolution: called once per tower call, whatever module the encoder wraps
    tower = next(m for name, m in engine.module.named_modules() if "vision" in name and isinstance(m, torch.nn.Conv2d))
    tower_calls = []
    tower_hook = tower.register_forward_hook(lambda m, args, out: tower_calls.append(1))
    for step in range(2):
        loss = loss_of(engine, batch)
        if step == 0:
            hook.remove()
            tower_hook.remove()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    after = gathered(engine.module)
    with torch.no_grad():
        trained_loss = float(loss_of(engine, batch))

    # check 3: what the engine saves
    engine.save_16bit_model(str(out / "model16"), "pytorch_model.bin")
    engine.save_checkpoint(str(out / "checkpoint"), tag="step2")
    if stage == 3 or rank == 0:  # ZeRO-3: every rank calls it (it gathers); else one writer (ranks would race)
        dualview.save_adapter(engine.module, out / "adapter")
    dist.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
        from safetensors.torch import save_file

        convert_zero_checkpoint_to_fp32_state_dict(str(out / "checkpoint"), str(out / "fp32"), tag="step2")
        config = engine.module.config
        config.architectures = [type(engine.module).__name__]  # what save_pretrained records
        for folder in ("model16", "fp32"):
            config.save_pretrained(out / folder)
        save_file({k: v.contiguous() for k, v in after.items()}, str(out / "ref.safetensors"))
    report["engine"] = {
        "plain_loss": on_all_ranks(plain_loss),
        "step0_loss": on_all_ranks(losses[0]),
        "losses": on_all_ranks(losses),
        "dem_calls": on_all_ranks(dem_calls),
        "tower_calls": on_all_ranks(len(tower_calls)),
        "trained_loss": on_all_ranks(trained_loss),
        "max_change": max_change(before, after),
        "dual_view_names": sorted(dual_view_names(engine.module)),
        "partitioned": sorted(name for name, n in local_sizes.items() if n == 0),
        "parameters": sorted(local_sizes),
        "counts_before_engine": counts,
        "counts_in_engine": counts_in_engine,
    }
    return engine, batch


def check_zero_init(host, stage, out, report, engine, batch):
    """Check 2: reloads while an HfDeepSpeedConfig is alive (ZeRO-3: built inside zero.Init)."""
    from transformers.integrations import HfDeepSpeedConfig

    config = engine_config(stage)
    ref = {k: v for k, v in gathered(engine.module).items() if part_of(k) == "dual_view"}
    alive = HfDeepSpeedConfig(config)  # noqa: F841 - transformers reads it through a weak reference
    results = {}
    for how in ("from_pretrained", "load"):
        if how == "from_pretrained":
            model = dualview.from_pretrained(out / "model16")
        else:
            model = dualview.load(host.cls.from_pretrained(out / "plain"), out / "adapter")
        host_sizes = {n: p.numel() for n, p in model.named_parameters() if part_of(n) != "dual_view"}
        got = {k: v for k, v in gathered(model).items() if part_of(k) == "dual_view"}
        reloaded = forward_engine(model, config)
        with torch.no_grad():
            loss = float(loss_of(reloaded, batch))
        results[how] = {
            "keys_match": sorted(got) == sorted(ref),
            "max_diff": max(float((got[k] - ref[k]).abs().max()) for k in ref) if sorted(got) == sorted(ref) else None,
            "host_partitioned": sum(n == 0 for n in host_sizes.values()), "host_parameters": len(host_sizes),
            "loss": on_all_ranks(loss),
        }
        del reloaded, model
    del alive
    report["zero_init"] = results


def check_trainer(host, stage, out, report):
    """Check 4: transformers' Trainer, a LLaVA-style config dict, freeze("stage1")."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    rank = dist.get_rank()
    args = TrainingArguments(
        output_dir=str(out / "trainer"), deepspeed=llava_config(stage), per_device_train_batch_size=1, max_steps=2,
        learning_rate=LR, weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=True, logging_steps=1,
        remove_unused_columns=False, disable_tqdm=True,
    )
    # the LLaVA recipe: the host loaded after TrainingArguments (ZeRO-3: inside zero.Init), then dual view
    torch.manual_seed(1)
    model = dualview.freeze(dualview.apply(host.cls.from_pretrained(out / "plain"), init="identity"), "stage1")
    before = gathered(model)

    class Samples(Dataset):  # one image per sample, the rank's sizes (the Trainer's sampler spreads them)
        samples = [host.batch([s]) for s in SIZES[0] + SIZES[1]]

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            return self.samples[i]

    def collate(items):
        (item,) = items
        return labelled(item, host.image_token_id)

    trainer = Trainer(model=model, args=args, train_dataset=Samples(), data_collator=collate)
    result = trainer.train()
    after = gathered(model)
    trainer.save_model(str(out / "trainer_model"))
    dist.barrier()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in after.items()}, str(out / "trainer_ref.safetensors"))
    report["trainer"] = {
        "world_size": trainer.args.world_size, "steps": result.global_step, "loss": result.training_loss,
        "max_change": max_change(before, after),
        "partitioned": sum(p.numel() == 0 for p in model.parameters()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", choices=sorted(HOSTS), required=True)
    parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checks", default="engine,zero_init,trainer")
    args = parser.parse_args()
    checks = args.checks.split(",")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    host = HOSTS[args.host]()
    out = args.out
    if dist.get_rank() == 0:
        host.model().save_pretrained(out / "plain")
    dist.barrier()
    report = {"world_size": dist.get_world_size(), "stage": args.stage, "host": args.host}
    engine, batch = check_engine(host, args.stage, out, report)
    if "zero_init" in checks:
        check_zero_init(host, args.stage, out, report, engine, batch)
    del engine
    if "trainer" in checks:
        check_trainer(host, args.stage, out, report)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    dist.barrier()


if __name__ == "__main__":
    main()
