"""The lmms-eval lane (``bash run.sh test-eval``, its own venv ``.venv-eval``): a tiny LLaVA-NeXT (and
LLaVA-OneVision) with dual view, saved by the adapter, evaluated by ``python -m lmms_eval --model
dualview_llava_next`` (``dualview_llava_onevision``) on a local 4-image task whose answers are the
adapted transformers model's own greedy answers: exact match 1.0 means lmms-eval ran the dual-view
model (the plain model answers otherwise, checked). Skipped where lmms-eval is not installed (the
main suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


import torch

from dualview.adapters import hf_llava_next, hf_llava_onevision

from .. import llava_onevision_models as onevision
from . import tiny_llava_next as tiny

QUESTION = "what is in the picture ?"
NEW_TOKENS = 6
SIZES = [(90, 150), (150, 60), (60, 60), (100, 200)]
TASK = "dualview_tiny"


def onevision_model():
    model = hf_llava_onevision.apply(onevision.tiny_model(), num_heads=2)
    tiny.louder_dem(model)
    return model


def onevision_processor():
    processor = onevision.tiny_processor()
    processor.chat_template = tiny.CHAT_TEMPLATE
    return processor


HOSTS = {  # lmms-eval model id -> adapter, adapted tiny model, its processor (with a chat template)
    "dualview_llava_next": (hf_llava_next, tiny.model, tiny.processor),
    "dualview_llava_onevision": (hf_llava_onevision, onevision_model, onevision_processor),
}


def answers(model, processor, images) -> list[str]:
    """Greedy answers as lmms-eval's llava_hf chat model asks: the processor's chat template over an
    image part and a text part, eos as padding, ``max_new_tokens`` from the task."""
    eos = processor.tokenizer.eos_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = []
    for image in images:
        inputs = processor(images=[image], text=text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos,
                                 eos_token_id=eos)
        out.append(processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return out


@pytest.fixture(scope="module", params=sorted(HOSTS))
def task(request, tmp_path_factory):
    """The model id, the saved model and a local task whose targets are the dual-view model's answers."""
    model_id = request.param
    adapter, build_model, build_processor = HOSTS[model_id]
    root = tmp_path_factory.mktemp(model_id)
    folder = root / "model"
    build_model().save_pretrained(folder)
    processor = build_processor()
    processor.save_pretrained(folder)
    images = [tiny.image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    adapted = answers(adapter.from_pretrained(folder).eval(), processor, images)
    plain = answers(adapter.unapply(adapter.from_pretrained(folder).eval()), processor, images)
    assert adapted != plain, "the task must tell dual view from the plain model"
    tasks = root / "tasks"
    tasks.mkdir()
    with open(tasks / "data.jsonl", "w") as f:
        for i, (image, answer) in enumerate(zip(images, adapted)):
            path = tasks / f"image{i}.png"
            image.save(path)
            f.write(json.dumps({"id": i, "image": str(path), "question": QUESTION, "answer": answer}) + "\n")
    (tasks / "utils.py").write_text(textwrap.dedent("""\
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc):
            return doc["question"]
    """))
    (tasks / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files: {tasks / "data.jsonl"}
        test_split: train
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {NEW_TOKENS}
          temperature: 0
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0.0
    """))
    return model_id, folder, tasks, adapted


@pytest.mark.parametrize("kind", ["chat", "simple"])
def test_lmms_eval_scores_the_dual_view_model(task, tmp_path, kind):
    model_id, folder, tasks, adapted = task
    if kind == "simple" and model_id != "dualview_llava_next":
        pytest.skip("the simple class is the same code path for every host: run once (LLaVA-NeXT)")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", model_id,
        "--model_args", f"pretrained={folder},device=cpu,dtype=float32", "--tasks", TASK,
        "--include_path", str(tasks), "--limit", str(len(SIZES)), "--batch_size", "1",
        "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG",
    ] + (["--force_simple"] if kind == "simple" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    log = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, log
    results = sorted(out.rglob("*_results.json"))
    assert results, f"lmms-eval wrote no results file under {out}:\n{log}"
    scores = json.loads(results[-1].read_text())["results"][TASK]
    assert scores["exact_match,none"] == 1.0, (scores, log)  # the DEM ran: the plain model's answers differ
    samples = [json.loads(line) for p in out.rglob("*_samples_*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(s["target"] for s in samples) == sorted(adapted)
    assert all(s["filtered_resps"] in (s["target"], [s["target"]]) for s in samples), samples
