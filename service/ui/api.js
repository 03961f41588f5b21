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
