// Vendors uPlot's built files from node_modules (installed by `npm install`) into vendor/,
// which is committed and embedded in vigil-aggregator with the sources in src/
// (aggregator/src/http/ui.rs), so neither the binary nor CI needs npm. Run after changing
// uPlot's version in package.json.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "vendor");
mkdirSync(vendor, { recursive: true });
for (const file of ["uPlot.iife.min.js", "uPlot.min.css"]) {
  copyFileSync(join(here, "node_modules", "uplot", "dist", file), join(vendor, file));
}
console.log(`uPlot vendored into ${vendor}`);
