// HiStream frontend extension.
// * Dual-Res Sampler: the mode preset labels each override knob with the mode's value ("-1" = use it) and greys out
//   the knobs the mode does not use (their values reset to -1 / empty, which the sampler would otherwise refuse).
//   The table comes from Python (the "histream_modes" option of the mode input), so it cannot drift from the modes.
// * While the sampler runs, "chunk i/n, call j/m, cache k frames" is drawn under the node (event
//   "histream.progress" from nodes/sampler.py); afterwards the node's summary, and the Cost Readout's report. A run
//   that is cancelled or fails says where it stopped instead of looking as if it were still running.
// * A step string in low|high form is cleared when the mode has no low-resolution pass (the sampler refuses it).
// Existing callbacks are always chained, never replaced.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "HiStreamDualResSampler";
const TEXT_NODES = new Set([SAMPLER, "HiStreamCostReadout"]);
const MODE_VALUE = -1;

function chain(target, name, after) {
  const original = target[name];
  target[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function applyMode(node, table) {
  const mode = node.widgets?.find((w) => w.name === "mode");
  const knobs = table[mode?.value];
  if (!knobs) return;
  for (const [name, value] of Object.entries(knobs)) {
    const widget = node.widgets.find((w) => w.name === name);
    if (!widget) continue;
    const unused = value === null;
    widget.disabled = unused;
    if (unused) widget.value = typeof widget.value === "string" ? "" : MODE_VALUE;
    const lowStepsGiven = typeof widget.value === "string" && widget.value.includes("|");
    if (lowStepsGiven && typeof value === "string" && !value.includes("|")) widget.value = "";
    widget.label = unused ? `${name}: unused by ${mode.value}` : `${name} (${mode.value}: ${value})`;
  }
  node.setDirtyCanvas(true, true);
}

function setStatus(node, lines, running = false) {
  node.histreamStatus = lines;
  node.histreamRunning = running;
  node.setDirtyCanvas(true, false);
}

function markStopped(why) {
  for (const node of app.graph?.nodes ?? app.graph?._nodes ?? []) {
    if (node.histreamRunning) setStatus(node, [`${why} at ${node.histreamStatus[0]}`]);
  }
}

function drawStatus(node, ctx) {
  const lines = node.histreamStatus;
  if (!lines?.length || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#8fc7ff";
  ctx.textAlign = "left";
  lines.forEach((line, i) => ctx.fillText(line, 4, node.size[1] + 16 + 15 * i));
  ctx.restore();
}

app.registerExtension({
  name: "HiStream.ui",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const proto = nodeType.prototype;
    chain(proto, "onDrawForeground", function (ctx) {
      drawStatus(this, ctx);
    });
    chain(proto, "onExecuted", function (message) {
      if (message?.text) setStatus(this, message.text.flatMap((t) => String(t).split("\n")));
    });
    if (nodeData.name !== SAMPLER) return;

    const table = nodeData.input?.required?.mode?.[1]?.histream_modes ?? {};
    chain(proto, "onNodeCreated", function () {
      const mode = this.widgets?.find((w) => w.name === "mode");
      if (!mode) return;
      const node = this;
      chain(mode, "callback", () => applyMode(node, table));
      applyMode(this, table);
    });
    chain(proto, "onConfigure", function () {
      applyMode(this, table);  // after a workflow's saved values are in the widgets
    });
  },

  setup() {
    api.addEventListener("histream.progress", ({ detail }) => {
      const node = app.graph?.getNodeById(detail.node);
      if (!node) return;
      setStatus(node, [
        `chunk ${detail.chunk}/${detail.num_chunks} · call ${detail.call}/${detail.total_calls} (${detail.kind})`,
        `cache: ${detail.cached_frames} latent frames`,
      ], true);
    });
    api.addEventListener("execution_interrupted", () => markStopped("cancelled"));
    api.addEventListener("execution_error", () => markStopped("stopped by an error"));
  },
});
