#!/usr/bin/env python3
"""How long a running stream waits for its tokens while another request's long prompt is
prefilled (docs/serve.md, "Chunked prefill"). Standard library only.

Start a server, then run this against it, once per `--prefill-chunk` to compare:

    adadim serve --model out/smollm2-w3g64-rtn-ada --port 8120 --prefill-chunk 64 &
    python3 benches/prefill_stall.py --port 8120 --model smollm2-w3g64-rtn-ada

One request streams a long greedy completion; after its fifth token, a second request sends a
prompt of `--prompt-tokens` token ids and asks for one token. Reported: the second request's
latency, the stream's tokens that arrived meanwhile, and the stream's longest wait for a token
in that time, against its median wait outside it.
"""

import argparse
import json
import threading
import time
import urllib.request


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    return urllib.request.urlopen(request)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", required=True, help="the served model's name")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/v1/completions"

    arrivals = []

    def stream():
        body = {"model": args.model, "prompt": "Count from 1 to 500: 1, 2, 3,",
                "max_tokens": 600, "temperature": 0, "stream": True}
        for line in post(url, body):
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter())

    streamer = threading.Thread(target=stream)
    streamer.start()
    while len(arrivals) < 5:
        time.sleep(0.001)
    prompt = [100 + (i * 37) % 5000 for i in range(args.prompt_tokens)]
    start = time.perf_counter()
    json.load(post(url, {"model": args.model, "prompt": prompt, "max_tokens": 1,
                         "temperature": 0}))
    end = time.perf_counter()
    streamer.join()

    waits = [(a, b) for a, b in zip(arrivals, arrivals[1:])]
    during = [b - a for a, b in waits if b > start and a < end]
    outside = sorted(b - a for a, b in waits if b <= start or a >= end)
    print(f"prompt of {args.prompt_tokens} tokens: answered in {1e3 * (end - start):.0f} ms; "
          f"the stream got {sum(start < t < end for t in arrivals)} tokens meanwhile, "
          f"longest wait {1e3 * max(during):.0f} ms "
          f"(median wait otherwise {1e3 * outside[len(outside) // 2]:.1f} ms)")


if __name__ == "__main__":
    main()
