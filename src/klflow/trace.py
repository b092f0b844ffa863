"""`klflow trace`: record a generation step by step and write it as one self-contained HTML page.

The samplers report a Frame after every step (klflow.sampling.Observer): each position's top
token and its posterior probability. The page replays the frames with a slider and a play
button, the text of every sequence at the chosen step, each token shaded by its probability,
with the step's time t and the network calls (NFE) so far. It needs no network: its script,
styles and data are inline. `#step=K` (or `#step=last`) in the address opens it at step K.
"""

from __future__ import annotations

import html
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch

from klflow.errors import KLFlowError
from klflow.filling import CheckpointSampler
from klflow.infill import Template
from klflow.sampling import Frame

PROBABILITY_DIGITS = 3


def record_trace(sampler: CheckpointSampler, num_samples: int, steps: int, seed: int,
                 template: Template | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The frames of one generate() call of the checkpoint's method, as the page's JSON data.

    template: a prompt to continue (its given positions show with probability 1); None: unconditional.
    progress: the sampler's progress callback.
    """
    method = sampler.method
    if "observe" not in inspect.signature(method.generate).parameters:
        raise KLFlowError(f"method {method.name!r} does not report its steps; klflow trace replays klflow, mdlm, "
                          f"dfm and sedd runs")
    frames: list[Frame] = []
    prompt = cond_mask = None
    if template is not None:
        prompt, cond_mask = template.row(sampler.seq_len, sampler.tokenizer)
    generator = torch.Generator(device=sampler.device).manual_seed(seed)
    ids = method.generate(sampler.forward, num_samples, sampler.seq_len, steps, prompt=prompt, cond_mask=cond_mask,
                          generator=generator, device=sampler.device, progress=progress, observe=frames.append,
                          **sampler.options).cpu()
    texts = token_texts(sampler.tokenizer)
    used = sorted({int(i) for frame in frames for i in frame.tokens.flatten().tolist()} | set(ids.flatten().tolist()))
    return {
        "method": method.name,
        "settings": {k: v for k, v in sampler.info.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "steps": steps, "seed": seed, "num_samples": num_samples, "seq_len": sampler.seq_len,
        "vocab": {str(i): texts[i] for i in used},
        "frames": [{"step": f.step, "t": round(float(f.t), 6), "nfe": int(f.nfe), "tokens": f.tokens.cpu().tolist(),
                    "p": [[round(p, PROBABILITY_DIGITS) for p in row] for row in f.probabilities.cpu().tolist()]}
                   for f in frames],
        "samples": [sampler.tokenizer.decode(row) for row in ids.tolist()],
    }


def token_texts(tokenizer: Any) -> list[str]:
    """Each id's text as klflow's decode shows it: end-of-text as a newline, padding and mask as nothing."""
    texts = tokenizer.token_texts()
    texts[tokenizer.eot_id] = "\n"
    return texts


def write_trace_page(trace: dict[str, Any], file: Path) -> None:
    """The self-contained page replaying `trace` (record_trace's data), written to file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(trace_page(trace), encoding="utf-8")
    tmp.replace(file)


def trace_page(trace: dict[str, Any]) -> str:
    """The HTML of the page; "</" in the data is escaped so no text can close its script element."""
    data = json.dumps(trace, ensure_ascii=False).replace("</", "<\\/")
    settings = ", ".join(f"{k}={v}" for k, v in trace["settings"].items() if k not in ("checkpoint", "method") and v is not None)
    title = f"klflow trace: {trace['method']}" + (f" ({trace['settings']['sampler']})" if "sampler" in trace["settings"] else "")
    return _PAGE.format(title=html.escape(title), settings=html.escape(settings),
                        checkpoint=html.escape(str(trace["settings"].get("checkpoint", ""))), data=data)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2433; background: #fbfbfd; }}
h1 {{ font-size: 1.25rem; margin: 0 0 0.25rem; }}
.meta {{ color: #5b6475; font-size: 0.85rem; margin-bottom: 1rem; }}
.controls {{ display: flex; align-items: center; gap: 1rem; margin-bottom: 1rem; flex-wrap: wrap; }}
#step {{ width: min(40rem, 90vw); }}
button {{ font-size: 1rem; padding: 0.3rem 1rem; }}
.readout {{ font-variant-numeric: tabular-nums; }}
.sequence {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.95rem; line-height: 1.8;
             background: white; border: 1px solid #d8dce6; border-radius: 6px; padding: 0.6rem; margin-bottom: 0.8rem; }}
.sequence span {{ border-radius: 3px; }}
.legend {{ font-size: 0.8rem; color: #5b6475; }}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="meta">{settings}<br>{checkpoint}</div>
<div class="controls">
  <button id="play" type="button">Play</button>
  <input id="step" type="range" min="0" max="0" value="0" aria-label="step">
  <span class="readout" id="step-label"></span>
  <span class="readout">t = <span id="t"></span></span>
  <span class="readout">NFE <span id="nfe"></span></span>
</div>
<div id="sequences"></div>
<div class="legend">Each position shows its current top token; the deeper its shade, the higher its posterior probability
(hover for the number).</div>
<script type="application/json" id="trace-data">{data}</script>
<script>
"use strict";
const trace = JSON.parse(document.getElementById("trace-data").textContent);
const slider = document.getElementById("step");
const play = document.getElementById("play");
const box = document.getElementById("sequences");
const last = trace.frames.length - 1;
slider.max = String(last);
const rows = trace.frames[0].tokens.map((_, b) => {{
  const row = document.createElement("div");
  row.className = "sequence";
  row.dataset.index = String(b);
  box.appendChild(row);
  return row;
}});
function show(index) {{
  const frame = trace.frames[index];
  document.getElementById("step-label").textContent = "step " + frame.step + " / " + trace.frames[last].step;
  document.getElementById("t").textContent = frame.t.toFixed(4);
  document.getElementById("nfe").textContent = String(frame.nfe);
  rows.forEach((row, b) => {{
    row.replaceChildren(...frame.tokens[b].map((id, l) => {{
      const p = frame.p[b][l];
      const span = document.createElement("span");
      span.textContent = trace.vocab[String(id)];
      span.title = "p = " + p.toFixed(3);
      span.style.backgroundColor = "rgba(52, 120, 246, " + (0.08 + 0.6 * p).toFixed(3) + ")";
      return span;
    }}));
  }});
}}
slider.addEventListener("input", () => show(Number(slider.value)));
let timer = null;
function stop() {{ clearInterval(timer); timer = null; play.textContent = "Play"; }}
play.addEventListener("click", () => {{
  if (timer !== null) {{ stop(); return; }}
  if (Number(slider.value) === last) {{ slider.value = "0"; slider.dispatchEvent(new Event("input")); }}
  play.textContent = "Pause";
  timer = setInterval(() => {{
    if (Number(slider.value) >= last) {{ stop(); return; }}
    slider.value = String(Number(slider.value) + 1);
    slider.dispatchEvent(new Event("input"));
  }}, Math.max(40, 4000 / Math.max(last, 1)));
}});
function fromAddress() {{
  const match = /step=(last|\\d+)/.exec(location.hash);
  if (match === null) return;
  slider.value = String(match[1] === "last" ? last : Math.min(Number(match[1]), last));
  slider.dispatchEvent(new Event("input"));
}}
window.addEventListener("hashchange", fromAddress);
show(0);
fromAddress();
</script>
</body>
</html>
"""
