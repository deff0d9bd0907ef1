"""The official `openai` client against `adadim serve`: completions, chat, streaming, echo
logprobs, several choices and chat logprobs. Run by tests/openai_client.rs as `python openai_client.py BASE_URL MODEL`; any failed
assertion or client error exits non-zero."""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

assert [m.id for m in client.models.list().data] == [model]

# Completions: greedy, whole and streamed, give the same text.
prompt = "The three primary colors are"
whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
choice = whole.choices[0]
assert choice.text, whole
assert choice.finish_reason in ("length", "stop"), whole
assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 1, whole.usage
streamed = client.completions.create(
    model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
)
chunks = list(streamed)
text = "".join(c.choices[0].text for c in chunks)
assert text == choice.text, (text, choice.text)
assert chunks[-1].choices[0].finish_reason == choice.finish_reason, chunks[-1]

# Echo with logprobs, as lm-evaluation-harness scores a continuation.
scored = client.completions.create(
    model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1
)
lp = scored.choices[0].logprobs
assert scored.choices[0].text.startswith(prompt), scored
assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
assert len(lp.tokens) == whole.usage.prompt_tokens + 1, (lp.tokens, whole.usage)
assert all(p <= 0 for p in lp.token_logprobs[1:]), lp.token_logprobs
# The generated (greedy) token is the most likely one.
assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values()), lp

# Chat: the checkpoint's template, whole and streamed.
messages = [{"role": "user", "content": "What is 2 + 2? Answer in one word."}]
chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0
)
reply = chat.choices[0].message
assert reply.role == "assistant" and reply.content, chat
assert "<|im_start|>" not in reply.content and "<|im_end|>" not in reply.content, reply
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for c in stream:
    if c.usage is not None:
        usage = c.usage
    for ch in c.choices:
        parts.append(ch.delta.content or "")
        finish = ch.finish_reason or finish
assert "".join(parts) == reply.content, (parts, reply.content)
assert finish == chat.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Several choices, and chat log-probabilities in the client's own types.
two = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, n=2, logprobs=True, top_logprobs=2
)
assert [c.index for c in two.choices] == [0, 1], two
assert two.choices[0].message.content == two.choices[1].message.content, two
content = two.choices[0].logprobs.content
assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content), content
assert content[0].top_logprobs[0].token == content[0].token, content[0]
several = client.completions.create(
    model=model, prompt=prompt, max_tokens=4, temperature=1.0, seed=3, n=3
)
assert [c.index for c in several.choices] == [0, 1, 2], several

# Errors reach the client as OpenAI errors with the server's message.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("an unknown model was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "no-such-model" in str(e), e

print("openai client: ok")
