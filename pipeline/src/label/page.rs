//! The labelling page: one file, no outside resources. Model text is put
//! in with `textContent`, never as HTML.

pub const HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rlhf: rank the answers</title>
<style>
body{font-family:system-ui,sans-serif;max-width:50rem;margin:2rem auto;padding:0 1rem}
pre{white-space:pre-wrap;background:#f4f4f4;padding:.6rem;border-radius:4px}
.answer{display:flex;gap:.8rem;align-items:flex-start;border:1px solid #ccc;border-radius:4px;padding:.4rem;margin:.4rem 0}
.answer:focus{outline:2px solid #36c}
.answer select{font-size:1.1rem}
</style></head><body>
<h1>Rank the answers</h1>
<p id="progress"></p>
<h2>Prompt</h2><pre id="prompt"></pre>
<h2>Answers <small>(1 = best; equal ranks are ties; focus an answer and press a number key)</small></h2>
<div id="answers"></div>
<p><label>Comment <input id="comment" size="50"></label></p>
<p><button id="submit">Submit ranking</button>
<button id="notrankable">All bad / not rankable</button>
<button id="skip">Skip</button></p>
<p id="status" role="status"></p>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const auth = {"Authorization": "Bearer " + token, "Content-Type": "application/json"};
let current = null;
function el(tag, text) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; }
async function load() {
  const r = await fetch("/api/next", {headers: auth});
  const answers = document.getElementById("answers");
  answers.replaceChildren();
  if (r.status === 204) { current = null; document.getElementById("prompt").textContent = "";
    document.getElementById("progress").textContent = "Nothing left to rank. Thank you."; return; }
  if (!r.ok) { document.getElementById("status").textContent = (await r.json()).error; return; }
  current = await r.json();
  document.getElementById("progress").textContent = (current.total - current.left) + " of " + current.total + " groups done";
  document.getElementById("prompt").textContent = current.prompt;
  current.responses.forEach((text, i) => {
    const row = el("div"); row.className = "answer"; row.tabIndex = 0;
    const select = el("select"); select.setAttribute("aria-label", "rank of answer " + (i + 1));
    current.responses.forEach((_, r) => { const o = el("option", String(r + 1)); o.value = r; select.append(o); });
    select.value = i;
    row.addEventListener("keydown", ev => { const n = parseInt(ev.key, 10);
      if (n >= 1 && n <= current.responses.length) { select.value = n - 1; ev.preventDefault(); } });
    const body = el("pre", text);
    row.append(select, body); answers.append(row);
  });
}
async function send(extra) {
  const body = Object.assign({group: current.group, comment: document.getElementById("comment").value}, extra);
  const r = await fetch("/api/submit", {method: "POST", headers: auth, body: JSON.stringify(body)});
  document.getElementById("status").textContent = r.ok ? "Saved." : (await r.json()).error;
  if (r.ok) { document.getElementById("comment").value = ""; load(); }
}
document.getElementById("submit").onclick = () => send({ranking:
  [...document.querySelectorAll("#answers select")].map(s => parseInt(s.value, 10))});
document.getElementById("notrankable").onclick = () => send({not_rankable: true});
document.getElementById("skip").onclick = () => send({skipped: true, reason: prompt("Why skip?") || ""});
load();
</script></body></html>
"##;
