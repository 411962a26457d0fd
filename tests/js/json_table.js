// Prints the expected payload texts for tests/test_js_json.py: what TelemetryDeck's
// JavaScript SDK sends for a list or object value, JSON.stringify of it, computed by
// Node.js. Each case is [the value in Python, the same value in JavaScript].
// Run: node tests/js/json_table.js   (and paste the output into the test's table)
const cases = [
  ["[1.0, 2.5]", [1.0, 2.5]],
  ['{"a": 2.0}', { a: 2.0 }],
  ["[1e-7, 1e16]", [1e-7, 1e16]],
  ["[1e21, 1.5e-7, 123.25, -0.0, 0.1 + 0.2]", [1e21, 1.5e-7, 123.25, -0.0, 0.1 + 0.2]],
  ["[float('nan'), float('inf'), float('-inf')]", [NaN, Infinity, -Infinity]],
  ["[datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)]", [new Date(Date.UTC(2024, 0, 1))]],
  ['{"b": 1, "1": 2}', { b: 1, "1": 2 }],
  ['{"z": 1, "10": 2, "2": 3, "01": 4, "-1": 5, "a": 6}', { z: 1, "10": 2, "2": 3, "01": 4, "-1": 5, a: 6 }],
  ["[True, False, None, 0, -7, 'x']", [true, false, null, 0, -7, "x"]],
  ['["quote \\" back \\\\ tab \\t nl \\n ctl \\x01 del \\x7f é \\u2028"]', ["quote \" back \\ tab \t nl \n ctl \x01 del \x7f é \u2028"]],
  ['{"k": None, "n": 1}', { k: null, n: 1 }],
  ["[]", []],
  ["{}", {}],
  ["(3, 4.5)", [3, 4.5]],
];
// The expected text as a Python string literal, ASCII only (DEL and U+2028 escaped).
const literal = (text) => JSON.stringify(text).replace(
  /[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
for (const [python, value] of cases) {
  console.log(`    (${python},\n     ${literal(JSON.stringify(value))}),`);
}
