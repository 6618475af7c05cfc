"""A scripted judge behind LitServe's OpenAI chat-completions spec, for tests of
``JudgeLabeller`` on a real loopback server: ``python -m tests.judge_server --port N``.

The verdict depends only on the two responses it finds in ``DEFAULT_TEMPLATE``'s sections:
the longer one (in words) wins, equal lengths tie. A response holding ``GARBLE`` gets an
answer that names no verdict; a prompt holding ``BIASED`` always gets ``A`` (a judge with a
position bias); ``CRASH`` makes the server fail (HTTP 500). Usage counts words: prompt
tokens are the words of all messages, completion tokens the words of the answer.
"""

import argparse
import re

import litserve as ls

SECTIONS = re.compile(r"\[Prompt\]\n(.*)\n\n\[Response A\]\n(.*)\n\n"
                      r"\[Response B\]\n(.*)\n\n\[End\]", re.DOTALL)
# Varied wording and punctuation, as real judges answer.
SAYS = {"A": "Response A.", "B": "**B**", "tie": "Tie!"}


def verdict(content: str) -> str:
    found = SECTIONS.search(content)
    if found is None:
        return "I see no responses."
    prompt, a, b = found.groups()
    if "CRASH" in prompt:
        raise RuntimeError("scripted failure")
    if "GARBLE" in a + b:
        return "Both have their merits."
    if "BIASED" in prompt:
        return SAYS["A"]
    la, lb = len(a.split()), len(b.split())
    return SAYS["A" if la > lb else "B" if lb > la else "tie"]


class ScriptedJudge(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, request):
        content = request.messages[-1].content
        answer = verdict(content)
        prompt_tokens = sum(len((m.content or "").split()) for m in request.messages)
        completion_tokens = len(answer.split())
        yield {"role": "assistant", "content": answer, "prompt_tokens": prompt_tokens,
               "completion_tokens": completion_tokens,
               "total_tokens": prompt_tokens + completion_tokens}


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("--port", type=int, required=True)
    port = args.parse_args().port
    server = ls.LitServer(ScriptedJudge(spec=ls.OpenAISpec()), accelerator="cpu", devices=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False,
               num_api_servers=1)
