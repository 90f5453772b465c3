"""A few training steps of a tiny transformers Llava with dual view, under DDP, FSDP or accelerate.

    torchrun --nproc_per_node=2 examples/distributed/train_tiny_llava.py --engine ddp  --out OUT
    torchrun --nproc_per_node=2 examples/distributed/train_tiny_llava.py --engine fsdp --out OUT
    torchrun --nproc_per_node=2 examples/distributed/train_tiny_llava.py --engine accelerate --out OUT  # Accelerator joins torchrun's group

CPU and gloo here (tests/test_distributed.py runs all three); on GPUs use --backend nccl. The vision
tower is frozen; the DEM, the projector and the LLM train. Rank 0 writes OUT/model (save_pretrained,
loadable with dualview.adapters.hf_llava.from_pretrained) and OUT/report.json: whether the DEM
parameters are identical on all ranks after training, and the losses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from dualview import testing as tiny
from dualview.adapters import hf_llava


def build():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    torch.manual_seed(0)  # the same initial weights on every rank
    config = LlavaConfig(vision_config=tiny.clip_config(), text_config=tiny.llama_config(),
                         image_token_id=tiny.IMAGE_TOKEN_ID, vision_feature_layer=-2)
    model = hf_llava.apply(LlavaForConditionalGeneration(config), grid=(2, 2))
    model.model.vision_tower.requires_grad_(False)
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tiny.tokenizer(), patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, hf_llava.prepare_processor(processor, model)


def wrap(model, engine: str):
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)  # FSDP2: parameters become sharded DTensors, gathered around forward/backward
    return model


def full_state(model, engine: str) -> dict[str, torch.Tensor]:
    if engine in ("ddp", "accelerate"):  # both hold the model in .module (DistributedDataParallel)
        return {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ddp", "fsdp", "accelerate"), required=True)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    accelerator = None
    if args.engine == "accelerate":  # accelerate launch set up the processes; Accelerator joins them
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.backend == "gloo")
    else:
        dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    model, processor = build()
    before = {k: v.clone() for k, v in model.model.spatial_embed.state_dict().items()}
    if accelerator is None:
        wrapped = wrap(model, args.engine)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for step in range(args.steps):
        # each rank its own images: the gradients differ, the engine must reconcile them
        images = [tiny.pil_image(40 + 10 * rank, 60, seed=100 * step + rank) for _ in range(2)]
        inputs = processor(images=images, text=[tiny.PROMPT] * 2, return_tensors="pt", padding=True)
        loss = wrapped(**inputs, labels=inputs["input_ids"]).loss
        loss.backward() if accelerator is None else accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = full_state(wrapped, args.engine)
    dem = {k[len("model.spatial_embed."):]: v for k, v in state.items() if k.startswith("model.spatial_embed.")}
    flat = torch.cat([v.float().flatten() for _, v in sorted(dem.items())])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        single, _ = build()
        single.load_state_dict(state)  # the gathered full state into a plain single-process model
        single.save_pretrained(args.out / "model")
        report = dict(
            engine=args.engine, world_size=world, losses=losses,
            dem_identical_on_all_ranks=all(torch.equal(gathered[0], g) for g in gathered[1:]),
            dem_changed=any(not torch.equal(before[k], dem[k]) for k in before),
            dem_sum=float(flat.double().sum()),
        )
        (args.out / "report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
    dist.barrier()
    if accelerator is None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
