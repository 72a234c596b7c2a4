// Runner's own HTTP clients call a task server at RUNNER_BASE (token RUNNER_TOKEN) and
// print what each call gave, as one JSON line: values, types and error fields.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.RUNNER_DIR, "package.json"));
const { createHttpClient, Serializer } = require("@bluelibs/runner");
const { createHttpMixedClient, createHttpSmartClient } = require("@bluelibs/runner/node");

const baseUrl = process.env.RUNNER_BASE;
const token = process.env.RUNNER_TOKEN;
const serializer = new Serializer();
const clients = {
  fetch: createHttpClient({ baseUrl, auth: { token }, serializer }),
  mixed: createHttpMixedClient({ baseUrl, auth: { token }, serializer }),
  smart: createHttpSmartClient({ baseUrl, auth: { token }, serializer }),
};

async function outcome(call) {
  try {
    const value = await call();
    if (value instanceof Date) return { ok: true, date: value.toISOString() };
    return { ok: true, value: value === undefined ? "<undefined>" : value };
  } catch (error) {
    return {
      ok: false,
      code: error.code,
      message: error.message,
      httpCode: error.httpCode,
      id: error.id,
      data: error.data,
    };
  }
}

const out = {};
for (const [name, client] of Object.entries(clients)) {
  out[name] = {
    add: await outcome(() => client.task("math.add", { a: 2, b: 40 })),
    shift: await outcome(() => client.task("clock.shift", new Date("2024-02-28T12:00:00.000Z"))),
    forbidden: await outcome(() => client.task("not.exposed", 1)),
    appError: await outcome(() => client.task("typed")),
    internal: await outcome(() => client.task("boom")),
    event: await outcome(() => client.event("app.events.ping", { n: 1 })),
    eventResult: await outcome(() => client.eventWithResult("app.events.ping", { n: 2 })),
  };
  const echoed = await client.task("echo", {
    big: 12345678901234567890n,
    set: new Set([1, 2]),
    map: new Map([["k", 1]]),
    nan: NaN,
    undef: undefined,
    re: /a+b/gi,
    __type: "user key",
  });
  out[name].typedCheck = {
    big: typeof echoed.big === "bigint" && echoed.big === 12345678901234567890n,
    set: echoed.set instanceof Set && echoed.set.has(2),
    map: echoed.map instanceof Map && echoed.map.get("k") === 1,
    nan: Number.isNaN(echoed.nan),
    undef: "undef" in echoed && echoed.undef === undefined,
    re: echoed.re instanceof RegExp && echoed.re.source === "a+b" && echoed.re.flags === "gi",
    userKey: echoed.__type === "user key",
  };
}
console.log(JSON.stringify(out));
