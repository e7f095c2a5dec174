"""The page's HTML, script and style: static, so the server only adds data through the JSON API."""

from __future__ import annotations

__all__ = ["PAGE_CSS", "PAGE_HTML", "PAGE_JS"]

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedclinic: results to confirm</title>
<link rel="stylesheet" href="/page.css">
<script src="/page.js" defer></script>
</head>
<body>
<header>
<h1>AI results at this clinic</h1>
<p>Confirm the finding when it is right, or correct it. Each answer becomes a label this clinic's model
learns from; the images and the labels never leave this clinic. Not for diagnostic use.</p>
</header>
<main>
<section aria-labelledby="studies-title">
<h2 id="studies-title">Recent studies</h2>
<p id="studies-status" role="status">Loading...</p>
<div id="studies"></div>
</section>
<section aria-labelledby="left-title">
<h2 id="left-title">What left this clinic</h2>
<p id="left-summary" role="status">Loading...</p>
<ul id="left-list"></ul>
</section>
</main>
</body>
</html>
"""

PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1b1b; background: #fafafa; }
header p { max-width: 60rem; }
#studies { display: flex; flex-wrap: wrap; gap: 1rem; }
.study { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 0.75rem; width: 17rem; }
.study img { width: 256px; height: 256px; object-fit: contain; background: #000; display: block; }
.study .finding { font-weight: 600; margin: 0.5rem 0 0.25rem; }
.study .envelope { color: #8a4b00; margin: 0.25rem 0; }
.study .label { margin: 0.25rem 0 0.5rem; }
.study .label[data-label=""] { color: #666; }
.study button { margin: 0.2rem 0.2rem 0.2rem 0; }
.study .error { color: #a00000; }
#left-list li { margin: 0.3rem 0; }
"""

PAGE_JS = """
"use strict";

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error || ("the node answered " + response.status));
  }
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    node.setAttribute(key, value);
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function showLabel(card, study) {
  const line = card.querySelector(".label");
  line.dataset.label = study.label || "";
  line.textContent = study.label
    ? "Label: " + study.label + " (by " + study.labeled_by + ")"
    : "Not labeled yet";
}

async function sendLabel(card, study, label) {
  const error = card.querySelector(".error");
  error.textContent = "";
  try {
    const answer = await api("/api/labels", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ study_instance_uid: study.study_instance_uid, label: label }),
    });
    study.label = answer.label;
    study.labeled_by = answer.labeled_by;
    showLabel(card, study);
  } catch (e) {
    error.textContent = "Not saved: " + e.message;
  }
}

function envelopeNote(study) {
  const where = study.envelope_images > 1
    ? study.outside_envelope + " of " + study.envelope_images + " images outside"
    : "Outside";
  const n = study.negative_images;
  const who = study.envelope_images === 1 ? "it looks" : n === 1 ? "1 looks" : n + " look";
  const why = n ? " (" + who + " like a negative image: check the display header)" : "";
  return where + " the model's input envelope: result less reliable" + why;
}

function studyCard(study, classes) {
  const card = el("article", { class: "study", "data-key": String(study.key) });
  card.appendChild(el("img", { src: study.thumbnail, alt: "image of the study" }));
  const finding = study.finding === null
    ? "No finding (" + study.state + ")"
    : "Finding: " + study.finding + ", score " + study.score.toFixed(2);
  card.appendChild(el("p", { class: "finding" }, finding));
  if (study.outside_envelope) {
    card.appendChild(el("p", { class: "envelope" }, envelopeNote(study)));
  }
  card.appendChild(el("p", { class: "meta" }, "Received " + study.received_at));
  card.appendChild(el("p", { class: "label" }));
  showLabel(card, study);
  if (study.finding !== null && classes.includes(study.finding)) {
    const confirm = el("button", { class: "confirm", type: "button" }, "Confirm: " + study.finding);
    confirm.addEventListener("click", () => sendLabel(card, study, study.finding));
    card.appendChild(confirm);
  }
  const choice = el("select", { class: "correct-choice", "aria-label": "correct label" });
  for (const name of classes) {
    if (name !== study.finding) {
      choice.appendChild(el("option", { value: name }, name));
    }
  }
  const correct = el("button", { class: "correct", type: "button" }, "Correct to");
  correct.addEventListener("click", () => sendLabel(card, study, choice.value));
  card.appendChild(correct);
  card.appendChild(choice);
  card.appendChild(el("p", { class: "error", role: "alert" }));
  return card;
}

async function loadStudies() {
  const status = document.getElementById("studies-status");
  try {
    const board = await api("/api/studies");
    const list = document.getElementById("studies");
    list.replaceChildren(...board.studies.map((s) => studyCard(s, board.classes)));
    status.textContent = board.studies.length
      ? board.studies.length + " recent studies; model classes: " + board.classes.join(", ")
      : "No study received yet.";
  } catch (e) {
    status.textContent = "Cannot read the studies: " + e.message;
  }
}

function describeUpdate(u, hub) {
  const when = u.sent_at ? "sent " + u.sent_at : "queued " + u.queued_at + " (" + u.state + ")";
  const privacy = u.charged
    ? (u.noise_multiplier === null
      ? "no noise added"
      : "privacy spent: epsilon " + Number(u.epsilon).toPrecision(3) + ", delta " + u.delta)
    : "privacy not recorded";
  return "A " + u.kind + " update of " + u.payload_bytes.toLocaleString() + " bytes for round " + u.round +
    " to " + (hub || "the hub") + ", " + when + "; " + privacy + ".";
}

async function loadUpdates() {
  const summary = document.getElementById("left-summary");
  try {
    const log = await api("/api/updates");
    summary.textContent = log.privacy.summary + " No image and no patient data ever leaves.";
    document.getElementById("left-list").replaceChildren(
      ...log.updates.map((u) => el("li", { class: "update" }, describeUpdate(u, log.hub_url))));
  } catch (e) {
    summary.textContent = "Cannot read what left this clinic: " + e.message;
  }
}

loadStudies();
loadUpdates();
"""
