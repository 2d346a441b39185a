"""The rater's HTML page (one self-contained document: inline CSS and JS, no external assets)."""

from __future__ import annotations

import html

RATER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Which image is better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #222; }
 main { max-width: 760px; margin: 0 auto; padding: 18px; text-align: center; }
 h1 { font-size: 1.1rem; font-weight: 600; margin: 0 0 4px; }
 #prompt { font-size: 1.35rem; margin: 10px 0 16px; padding: 10px; background: #fff; border-radius: 8px; }
 .pair { display: flex; gap: 18px; justify-content: center; }
 figure { margin: 0; }
 figure img { width: 300px; height: 300px; image-rendering: pixelated; background: #000; border-radius: 6px;
              border: 3px solid transparent; cursor: pointer; }
 figure img:hover { border-color: #3a7bd5; }
 figcaption { margin-top: 4px; color: #666; }
 .buttons { margin-top: 16px; display: flex; gap: 10px; justify-content: center; flex-wrap: wrap; }
 button { font-size: 1rem; padding: 9px 16px; border-radius: 6px; border: 1px solid #bbb; background: #fff; cursor: pointer; }
 button:hover { background: #e8f0fe; }
 kbd { font-size: .8rem; padding: 1px 5px; border: 1px solid #aaa; border-radius: 3px; background: #f7f7f7; }
 #status { margin-top: 14px; color: #555; min-height: 1.2em; }
 #done { display: none; font-size: 1.3rem; margin-top: 40px; }
</style></head>
<body data-state="loading">
<main>
 <h1>Which image matches the prompt better and looks better?</h1>
 <div id="rating">
  <div id="prompt">&nbsp;</div>
  <div class="pair">
   <figure><img id="left" alt="left image" data-answer="left"><figcaption>left <kbd>&larr;</kbd> / <kbd>1</kbd></figcaption></figure>
   <figure><img id="right" alt="right image" data-answer="right"><figcaption>right <kbd>&rarr;</kbd> / <kbd>2</kbd></figcaption></figure>
  </div>
  <div class="buttons">
   <button id="btn-left" data-answer="left">Left is better</button>
   <button id="btn-tie" data-answer="tie">Tie <kbd>&darr;</kbd> / <kbd>3</kbd></button>
   <button id="btn-both_bad" data-answer="both_bad">Both bad <kbd>&uarr;</kbd> / <kbd>4</kbd></button>
   <button id="btn-right" data-answer="right">Right is better</button>
  </div>
 </div>
 <div id="done">All comparisons done &mdash; thank you!</div>
 <div id="status"></div>
</main>
<script>
const token = new URLSearchParams(location.search).get("token") || "";
const hdr = {"X-Rater-Token": token, "Content-Type": "application/json"};
let pair = null, busy = false;
const $ = (id) => document.getElementById(id);
function status(msg) { $("status").textContent = msg; }
async function next() {
  busy = true; document.body.dataset.state = "loading";
  const r = await fetch("/api/next", {headers: hdr});
  const j = await r.json();
  if (!r.ok) { status(j.error || r.statusText); document.body.dataset.state = "error"; return; }
  if (j.done) { pair = null; $("rating").style.display = "none"; $("done").style.display = "block";
                status(`${j.answered} answered`); document.body.dataset.state = "done"; return; }
  pair = j;
  $("prompt").textContent = j.prompt;
  await Promise.all(["left", "right"].map((s) => new Promise((ok) => {
    const im = $(s); im.onload = ok; im.onerror = ok; im.src = j.images[s]; })));
  document.body.dataset.pairId = j.pair_id;
  document.body.dataset.state = "ready";
  status(`${j.answered} answered, ${j.remaining} to go`);
  busy = false;
}
async function vote(answer) {
  if (busy || !pair) return;
  busy = true; document.body.dataset.state = "voting";
  const r = await fetch("/api/vote", {method: "POST", headers: hdr,
                                      body: JSON.stringify({pair_id: pair.pair_id, answer: answer})});
  if (!r.ok) { const j = await r.json(); status(j.error || r.statusText); }
  document.body.dataset.lastAnswer = answer;
  await next();
}
document.querySelectorAll("[data-answer]").forEach((el) => el.addEventListener("click", () => vote(el.dataset.answer)));
const KEYS = {ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", ArrowDown: "tie", "3": "tie",
              t: "tie", ArrowUp: "both_bad", "4": "both_bad", b: "both_bad"};
document.addEventListener("keydown", (e) => { if (KEYS[e.key]) { e.preventDefault(); vote(KEYS[e.key]); } });
next();
</script>
</body></html>
"""

def message_page(title: str, text: str) -> str:
    """A minimal HTML page for errors (e.g. a missing rater token)."""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;margin:40px'><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(text)}</p></body></html>")
