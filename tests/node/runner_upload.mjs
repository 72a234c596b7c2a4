// Runner's Node clients upload files (createNodeFile: a buffer and a stream) and a raw
// stream to the task server at RUNNER_BASE; prints the results as one JSON line. Each file
// gets its own id: createNodeFile's default id is the same ("F1") for every file. The
// manifest is written without the typed serializer here, so it holds no Date.
import { createRequire } from "node:module";
import path from "node:path";
import { Readable } from "node:stream";

const require = createRequire(path.join(process.env.RUNNER_DIR, "package.json"));
const { Serializer } = require("@bluelibs/runner");
const { createHttpMixedClient, createHttpSmartClient, createNodeFile } = require("@bluelibs/runner/node");

const baseUrl = process.env.RUNNER_BASE;
const token = process.env.RUNNER_TOKEN;
const serializer = new Serializer();
const out = {};
for (const [name, create] of [["smart", createHttpSmartClient], ["mixed", createHttpMixedClient]]) {
  const client = create({ baseUrl, auth: { token }, serializer });
  const big = Buffer.alloc(3 * 1024 * 1024, 97);
  out[name] = {
    files: await client.task("files.describe", {
      label: "two files",
      doc: createNodeFile({ name: "a.txt", type: "text/plain" }, { buffer: Buffer.from("hello") }, "doc"),
      blob: createNodeFile(
        { name: "big.bin", type: "application/octet-stream" },
        { stream: Readable.from([big]) },
        "blob",
      ),
    }),
  };
  const raw = await client.task("raw.count", Readable.from([Buffer.from("abc"), Buffer.from("defg")]));
  out[name].raw = raw;
}
console.log(JSON.stringify(out));
