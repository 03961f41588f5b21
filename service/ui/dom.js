// Building elements. Children that are not nodes become text nodes, so whatever a job's data
// holds (rows, answers, error messages) is shown as text and never parsed as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(element, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  const nodes = children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false);
  element.append(...nodes.map((c) => (c instanceof Node ? c : String(c))));
  return element;
}

export const h = (tag, attrs = {}, ...children) => build(document.createElement(tag), attrs, children);
export const svg = (tag, attrs = {}, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

export function formatNumber(value, digits = 4) {
  if (value === undefined || value === null || Number.isNaN(value)) return "–";
  if (value !== 0 && (Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3)) return value.toExponential(2);
  return String(+value.toPrecision(digits));
}

export function formatTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function formatSeconds(seconds) {
  if (seconds === undefined || seconds === null) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
