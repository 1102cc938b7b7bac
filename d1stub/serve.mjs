// Shared by the stand-in's servers (server.mjs, readers.mjs): wait until miniflare serves, print
// "READY <url>", and stop on SIGTERM/SIGINT or when the process that started us is gone (so a killed test
// run leaves no server behind).
export async function serve(mf) {
  const url = await mf.ready;
  console.log(`READY ${url}`);
  let stopping = false;
  async function stop() {
    if (stopping) return;
    stopping = true;
    await mf.dispose();
    process.exit(0);
  }
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  const parent = process.ppid;
  setInterval(() => { if (process.ppid !== parent) stop(); }, 1000).unref();
}
