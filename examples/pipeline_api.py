"""The Python pipeline API on the embedded default model (SmolLM2-135M-Instruct, CPU, no server).

    python examples/pipeline_api.py

Shows `solve` for one question and a reusable `Pipeline` over several problems with a token budget.
"""

import asyncio

from ttscale import Budget, Pipeline, Problem, solve


def one_question() -> None:
    result = solve("What is 12 + 30?", strategy="self-consistency:n=4,max_tokens=128", backend="engine")
    print("answer:", result.answer)
    print("vote:", [(c["answer"], len(c["members"])) for c in result.decision.get("classes", [])])
    print("usage:", result.usage.model_dump(include={"generated_tokens", "sequential_tokens", "wall_time_s"}))


async def many_problems() -> None:
    problems = [
        Problem(id="add", prompt="What is 7 + 8?", answer="15"),
        Problem(id="mul", prompt="What is 6 * 7?", answer="42"),
        Problem(id="sub", prompt="What is 100 - 1?", answer="99"),
    ]
    async with Pipeline("engine", "ffs:n=4,max_tokens=128", budget=Budget(total_tokens=400),
                        concurrency=3, seed=0) as pipe:
        async for i, r in pipe.stream(problems):
            print(f"{problems[i].id}: answer={r.answer} correct={r.correct} "
                  f"tokens={r.usage.generated_tokens} saved (est.)={r.usage.saved_tokens}")


if __name__ == "__main__":
    one_question()
    asyncio.run(many_problems())
