// Runs script.py under Pyodide in this page, with kaibantrace and wrapt unpacked from the
// test's server, then posts {"result", "fetches", "error", "jspi"} to /result. Used by
// tests/test_browser.py.
//
// Once Pyodide has loaded its own files, fetch() is replaced by a recorder: a request to
// another origin is recorded and answered 200 instead of sent; one to this origin is
// recorded too, and passed on. "?optout=1" sets the page's opt-out variable first;
// "?leave=1" leaves the page once the result is posted.
import { loadPyodide } from "./pyodide/pyodide.mjs";

// Where the engine offers WebAssembly's stack switching (JSPI), Pyodide runs Python on
// stacks of its own, and Chromium's renderer then crashes now and then: a segmentation
// fault, reading past the end of such a stack, in 3 of 420 loads of this page on a busy
// machine (Pyodide's issue 6106 reports the like). kaibantrace needs no stack switching (it
// calls no run_sync), so the page hides JSPI from Pyodide: Python then runs as it does under
// Node.js 20, which has no JSPI.
delete WebAssembly.Suspending;
delete WebAssembly.promising;

const realFetch = window.fetch.bind(window);
const fetches = [];
let result = null;
let error = null;

async function download(path) {
  const response = await realFetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response;
}

try {
  const py = await loadPyodide({ indexURL: new URL("pyodide/", location.href).href });
  const site = py.runPython("import site; site.getsitepackages()[0]");
  py.unpackArchive(await (await download("kaibantrace.zip")).arrayBuffer(), "zip",
                   { extractDir: site });
  py.unpackArchive(await (await download("wrapt.whl")).arrayBuffer(), "wheel",
                   { extractDir: site });
  const script = await (await download("script.py")).text();

  if (new URLSearchParams(location.search).get("optout") === "1") {
    globalThis.KAIBAN_TELEMETRY_OPT_OUT = "1";
  }
  window.fetch = async (url, init = {}) => {
    fetches.push({
      url: String(url),
      method: init.method ?? "GET",
      body: init.body === undefined ? null : String(init.body),
      keepalive: Boolean(init.keepalive),
      headers: Object.fromEntries(new Headers(init.headers ?? {}).entries()),
    });
    if (new URL(String(url), location.href).origin === location.origin) {
      return realFetch(url, init);
    }
    return new Response("", { status: 200 });
  };

  await py.runPythonAsync(script);
  result = JSON.parse(py.globals.get("RESULT"));
} catch (e) {
  error = String(e?.stack ?? e);
}
const jspi = "Suspending" in WebAssembly;  // still there: the hiding above failed
await realFetch("result", { method: "POST",
                           body: JSON.stringify({ result, fetches, error, jspi }) });
// "?leave=1": then the user leaves the page, as a tab is closed or a link followed.
if (new URLSearchParams(location.search).get("leave") === "1") location.href = "about:blank";
