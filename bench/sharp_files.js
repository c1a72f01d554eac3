// sharp doing the pipeline's job (sharp_dir.js's: auto-orient, fit 1024x1024 inside without
// enlargement, strip metadata, WebP q80 or progressive JPEG q80 flattened on white; one thread)
// on each file given, printing {file: CPU ms} as JSON: process.cpuUsage() (user + system, every
// thread of the process) around each file, after one uncounted warm-up run on the first file
// (libvips start-up and codec initialisation belong to no image).
// Usage: node sharp_files.js OUT_DIR webp|jpeg FILE...
'use strict';
const fs = require('fs'), path = require('path');
const sharp = require(process.env.SHARP_MODULE || 'sharp');
sharp.cache(false);
sharp.concurrency(1);
const [outDir, fmt, ...files] = process.argv.slice(2);
fs.mkdirSync(outDir, { recursive: true });

function job(file) {
  let p = sharp(file).autoOrient().resize(1024, 1024, { fit: 'inside', withoutEnlargement: true });
  p = fmt === 'jpeg' ? p.flatten({ background: '#ffffff' }).jpeg({ quality: 80, progressive: true }) : p.webp({ quality: 80 });
  return p.toFile(path.join(outDir, path.basename(file).replace(/\.[^.]+$/, '') + (fmt === 'jpeg' ? '.jpg' : '.webp')));
}

(async () => {
  if (files.length) await job(files[0]);
  const cpuMs = {};
  for (const file of files) {
    const start = process.cpuUsage();
    await job(file);
    const used = process.cpuUsage(start);
    cpuMs[file] = (used.user + used.system) / 1000;
  }
  console.log(JSON.stringify(cpuMs));
})();
