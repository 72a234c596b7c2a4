// A real Runner server (nodeExposure) with the tasks and events the Python client calls.
// Prints "listening <port>" once ready. RUNNER_DIR: where @bluelibs/runner is installed.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.RUNNER_DIR, "package.json"));
const { r, run, globals } = require("@bluelibs/runner");
const { nodeExposure } = require("@bluelibs/runner/node");

const token = process.env.RUNNER_TOKEN;
const port = Number(process.env.RUNNER_PORT || 0);

const add = r
  .task("math.add")
  .run(async (input) => input.a + input.b)
  .build();

const shift = r
  .task("clock.shift")
  .run(async (when) => new Date(when.getTime() + 86400000))
  .build();

const echo = r
  .task("echo")
  .run(async (input) => input)
  .build();

const boom = r
  .task("boom")
  .run(async () => {
    throw new Error("secret detail");
  })
  .build();

const stock = r.error("app.errors.stock").httpCode(409).build();
const typed = r
  .task("typed")
  .run(async () => {
    stock.throw({ left: 0 });
  })
  .build();

const hidden = r.task("hidden").run(async () => "hidden").build();

const ping = r.event("app.events.ping").build();
const onPing = r
  .hook("app.hooks.onPing")
  .on(ping)
  .run(async (event) => {
    if (event.data && typeof event.data === "object") event.data.seen = true;
  })
  .build();

const tunnel = r
  .resource("app.tunnel")
  .tags([globals.tags.tunnel])
  .init(async () => ({
    mode: "server",
    transport: "http",
    tasks: [add, shift, echo, boom, typed],
    events: [ping],
  }))
  .build();

const exposure = nodeExposure.with({
  http: { basePath: "/__runner", listen: { port, host: "127.0.0.1" }, auth: { token } },
});

const app = r
  .resource("app")
  .register([add, shift, echo, boom, stock, typed, hidden, ping, onPing, tunnel, exposure])
  .build();

const runtime = await run(app, { logs: { printThreshold: null } });
const handlers = runtime.getResourceValue(exposure);
const address = handlers.server.address();
console.log(`listening ${address.port}`);
process.on("SIGTERM", async () => {
  await runtime.dispose();
  process.exit(0);
});
