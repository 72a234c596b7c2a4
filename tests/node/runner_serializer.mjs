// Runner's own Serializer reads each stdin line (typed JSON) and writes it back: one line
// out per line in, or "ERROR <message>" when it refuses the payload.
import { createRequire } from "node:module";
import path from "node:path";
import readline from "node:readline";

const require = createRequire(path.join(process.env.RUNNER_DIR, "package.json"));
const { Serializer } = require("@bluelibs/runner");
const serializer = new Serializer();

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  try {
    console.log(serializer.stringify(serializer.parse(line)));
  } catch (error) {
    console.log(`ERROR ${error.message}`);
  }
}
