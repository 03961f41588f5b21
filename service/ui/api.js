// The service's REST API, as the dashboard calls it. The API key lives in this tab's session
// storage and travels only in the Authorization header: never in a URL, a cookie or the page.

const KEY = "raysft.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// `path` is relative to /v1; the dashboard is served at /ui/, so this works behind any prefix.
export async function api(path, { method = "GET", query = {} } = {}) {
  const url = new URL(`../v1/${path}`, document.baseURI);
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const response = await fetch(url, { method, headers: { Authorization: `Bearer ${apiKey.get()}` } });
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const body = isJson ? await response.json() : await response.text();
  if (response.status === 401) apiKey.clear();
  if (!response.ok) throw new ApiError(response.status, describe(response.status, body));
  return body;
}

// What went wrong, in the service's own words (422s list every problem).
function describe(status, body) {
  const detail = body && body.detail;
  if (detail && Array.isArray(detail.problems)) return detail.problems.join("; ");
  if (typeof detail === "string") return detail;
  return `HTTP ${status}`;
}

// A read that may not exist yet (a pipeline before its training, a dataset before its manifest).
export async function optional(request, fallback) {
  try {
    return await request;
  } catch (error) {
    if (error instanceof ApiError && (error.status === 404 || error.status === 503)) return fallback;
    throw error;
  }
}

// A chat answer streamed as server-sent events (POST jobs/ID/chat with stream: true): `onText` is
// called with each piece of text as it arrives; resolves with the finish reason.
export async function chatStream(path, { query = {}, body }, onText) {
  const url = new URL(`../v1/${path}`, document.baseURI);
  for (const [name, value] of Object.entries(query)) url.searchParams.set(name, value);
  const response = await fetch(url, {
    method: "POST", body: JSON.stringify({ ...body, stream: true }),
    headers: { Authorization: `Bearer ${apiKey.get()}`, "Content-Type": "application/json" },
  });
  if (!response.ok) {
    const isJson = (response.headers.get("content-type") || "").includes("json");
    throw new ApiError(response.status, describe(response.status, isJson ? await response.json() : await response.text()));
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffered += value;
    const events = buffered.split("\n\n");
    buffered = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return finish;
      const choice = JSON.parse(data).choices[0];
      if (choice && choice.delta.content) onText(choice.delta.content);
      if (choice && choice.finish_reason) finish = choice.finish_reason;
    }
  }
}
