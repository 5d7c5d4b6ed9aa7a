"""Answering customer questions from the knowledge base (retrieval-augmented generation), with sources.

What it shows: governed reads from a vector store feeding a governed model call. Scheduled on the
``chroma://kb_support`` asset that ``kb_ingest`` updates. A sensor waits until the collection holds the
knowledge base (in reschedule mode, so no worker slot is held while waiting). Each question retrieves
the closest chunks (read permission from the policy's ``rag-answering`` rule; the retrieved ids and
content hashes go to the audit trail), the chunks go into the prompt as untrusted data labelled with
their ids, and the local model answers. The results file lists, per question, the answer and the ids
and source files of the chunks it was given: every answer can be traced to its sources.

Honest note: SmolLM2-135M answers briefly and sometimes misreads the context. Retrieval is the
dependable part here (the right document ranks first for each question); point the LLM connection at
a larger model and the same DAG gives better answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import Asset, dag, task

from governed_ai.core.paths import provider_home
from governed_ai.operators.chroma import ChromaQueryOperator
from governed_ai.operators.llm import LLMOperator
from governed_ai.sensors.chroma import ChromaCollectionSensor

QUESTIONS_FILE = Path(__file__).parent / "data" / "kb_questions.json"
COLLECTION = "kb_support"

# Measured with SmolLM2-135M: one retrieved chunk and a one-sentence answer work best; with two chunks
# the model mixes them up. A larger model can take more context (raise n_results).
SYSTEM_PROMPT = (
    "You are a support assistant. Answer the customer's question in one sentence, using only the "
    "document given."
)


def output_dir() -> Path:
    return provider_home() / "outputs" / "kb_answering"


@dag(
    dag_id="kb_answering",
    schedule=[Asset(f"chroma://{COLLECTION}")],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["governed-ai", "rag", "example"],
    default_args={"owner": "ai-platform", "retries": 1},
    doc_md=__doc__,
)
def kb_answering() -> None:
    wait = ChromaCollectionSensor(
        task_id="wait_for_knowledge_base", collection=COLLECTION, min_count=5, poke_interval=60, timeout=3600
    )

    @task
    def load_questions() -> list[str]:
        questions = json.loads(QUESTIONS_FILE.read_text())
        return [q["question"] for q in questions]

    questions = load_questions()
    retrieve = ChromaQueryOperator(task_id="retrieve", collection=COLLECTION, query=questions, n_results=1)

    @task
    def build_prompts(results: list[dict[str, Any]]) -> list[str]:
        return [f"{r['prompt_context']}\n\nQuestion: {r['query']}" for r in results]

    answer = LLMOperator.partial(
        task_id="answer", system_prompt=SYSTEM_PROMPT, temperature=0.0, max_tokens=64
    ).expand(prompt=build_prompts(retrieve.output))

    @task
    def write_answers(results: list[dict[str, Any]], answers: list[dict[str, Any]], **context: Any) -> str:
        questions = json.loads(QUESTIONS_FILE.read_text())
        run_id = str(context["run_id"]).replace(":", "_").replace("+", "_")
        path = output_dir() / f"{run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            for question, retrieved, answered in zip(questions, results, answers, strict=True):
                row = {
                    "question_id": question["question_id"],
                    "question": question["question"],
                    "answer": answered["content"].strip(),
                    "sources": retrieved["ids"],
                    "source_files": [c["source"] for c in retrieved["contexts"]],
                    "scores": [c["score"] for c in retrieved["contexts"]],
                }
                out.write(json.dumps(row) + "\n")
                print(f"{row['question_id']}: {row['answer']!r} <- {row['source_files']}")
        return str(path)

    wait >> questions
    write_answers(retrieve.output, answer.output)


kb_answering()
