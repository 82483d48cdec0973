// AudioWorklet processor: mixes the microphone's channels down to mono and posts Float32Array
// chunks of `chunkFrames` samples (at the AudioContext's rate) to the page, transferring the
// buffer. Render quanta are 128 frames; posting every ~10 ms keeps messages few and latency low.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const frames = (options.processorOptions && options.processorOptions.chunkFrames) || 480;
    this.size = frames;
    this.chunk = new Float32Array(frames);
    this.fill = 0;
    this.running = true;
    this.port.onmessage = (e) => { if (e.data === "stop") this.running = false; };
  }

  process(inputs) {
    const input = inputs[0];
    if (!this.running) return false;
    if (!input || input.length === 0) return true;  // no source connected yet
    const n = input[0].length;
    const scale = 1 / input.length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < input.length; c++) s += input[c][i];
      this.chunk[this.fill++] = s * scale;
      if (this.fill === this.size) {
        this.port.postMessage(this.chunk, [this.chunk.buffer]); // transferred: now detached
        this.chunk = new Float32Array(this.size);
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("streamtok-capture", CaptureProcessor);
