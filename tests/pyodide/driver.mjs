// Runs a Python file under Pyodide, in Node.js, with kaibantrace and wrapt installed from
// local files and every fetch() recorded instead of sent: the browser's platform, with
// no network. Used by tests/test_pyodide.py.
//
//   node driver.mjs <pyodide dir> <config.json>
//
// config: {"packages": {"<name>": "<local dir or .whl>", ...}, "script": "<file.py>",
//          "statuses": [200, {"status": 503, "headers": {...}, "delay": ms}, ...],
//          "globals": {"NAME": value, ...}, "env": {...}, "snapshot": "<file>"}
// or {"make_snapshot": "<file>"}: write a fresh interpreter's memory snapshot there, which
// later runs load from ("snapshot") instead of starting Python afresh.
// Each fetch() takes the next of "statuses" (200 once they run out; 0: the network
// refuses; "delay": answer that many milliseconds later, unless the request is aborted
// first) and is recorded with the time it was made, in milliseconds since the start. As
// Chromium does, a keepalive request whose body is over 64 KiB fails as a network error.
// A request to 127.0.0.1 (a test's own package index) is made for real and not recorded.
// Prints one JSON line: {"result": <the script's RESULT>, "fetches": [...], "error": ...}.
import { readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join, basename } from "node:path";
import { pathToFileURL } from "node:url";

const [pyodideDir, configPath] = process.argv.slice(2);
const config = JSON.parse(readFileSync(configPath, "utf8"));
const fetches = [];
const started = Date.now();
const statuses = [...(config.statuses ?? [])];

const realFetch = globalThis.fetch;
const hostOf = (url) => {  // pyfetch hands fetch() a Request, kaibantrace a string
  try { return new URL(url instanceof Request ? url.url : String(url)).hostname; }
  catch { return ""; }
};
globalThis.fetch = async (url, init = {}) => {
  if (hostOf(url) === "127.0.0.1") return realFetch(url, init);
  const record = {
    url: String(url),
    method: init.method ?? "GET",
    body: init.body === undefined ? null : String(init.body),
    keepalive: Boolean(init.keepalive),
    headers: Object.fromEntries(new Headers(init.headers ?? {}).entries()),
    at: Date.now() - started,
    aborted: false,
  };
  fetches.push(record);
  if (init.keepalive && new TextEncoder().encode(record.body ?? "").length > 65536) {
    throw new TypeError("Failed to fetch");
  }
  const answer = statuses.length ? statuses.shift() : 200;
  const { status, headers, delay } = typeof answer === "number" ? { status: answer } : answer;
  if (delay) {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, delay);
      init.signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        record.aborted = true;
        reject(new DOMException("The operation was aborted.", "AbortError"));
      });
    });
  }
  if (status === 0) throw new TypeError("fetch failed");  // the network refused
  return new Response("", { status, headers });
};
const { loadPyodide } = await import(pathToFileURL(join(pyodideDir, "pyodide.mjs")).href);
const env = { HOME: "/home/pyodide", ...(config.env ?? {}) };
if (config.make_snapshot) {  // a fresh interpreter's memory, for the runs that follow
  const fresh = await loadPyodide({ env, _makeSnapshot: true });
  writeFileSync(config.make_snapshot, fresh.makeMemorySnapshot());
  process.exit(0);
}
// From the snapshot, a load takes a fifth of the time. The restored interpreter keeps the
// environment it was made with and the state its random module starts from: each run
// gets its own of both, as a page load would.
let py;
if (config.snapshot) {
  py = await loadPyodide({ env, _loadSnapshot: readFileSync(config.snapshot) });
  const environ = py.pyimport("os").environ;
  for (const [name, value] of Object.entries(env)) environ.__setitem__(name, value);
  const random = py.pyimport("random");
  random.seed();
  environ.destroy();
  random.destroy();
} else {
  py = await loadPyodide({ env });
}
const site = py.runPython("import site; site.getsitepackages()[0]");
// The page's globals (its opt-out variable, a navigator) are set once Pyodide is loaded:
// its loader takes a global navigator for a browser's.
for (const [name, value] of Object.entries(config.globals ?? {})) globalThis[name] = value;

function copyTree(from, to) {  // a package's source directory into Pyodide's file system
  py.FS.mkdirTree(to);
  for (const entry of readdirSync(from)) {
    if (entry === "__pycache__") continue;
    const source = join(from, entry);
    if (statSync(source).isDirectory()) copyTree(source, `${to}/${entry}`);
    else py.FS.writeFile(`${to}/${entry}`, readFileSync(source));
  }
}

for (const [name, path] of Object.entries(config.packages ?? {})) {
  if (path.endsWith(".whl")) {  // a pure wheel: unpacked where pip would put it
    const target = `/tmp/${basename(path)}`;
    py.FS.writeFile(target, readFileSync(path));
    py.runPython(`import zipfile; zipfile.ZipFile(${JSON.stringify(target)}).extractall(${JSON.stringify(site)})`);
  } else {
    copyTree(path, `${site}/${name}`);
  }
}

let result = null;
let error = null;
try {
  await py.runPythonAsync(readFileSync(config.script, "utf8"));
  const value = py.globals.get("RESULT");
  result = value === undefined ? null : JSON.parse(value);
} catch (e) {
  error = String(e);
}
// Written, then the end: a send the page scheduled for later must not keep Node.js running.
process.stdout.write(JSON.stringify({ result, fetches, error }) + "\n", () => process.exit(0));
