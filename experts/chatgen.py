"""The `chat` preset's documents: built-in instructions answered by the teacher itself.

The prompts are 120 hand-written ones followed by templated ones (instruction template x topic,
in a fixed hashed order), ~2,600 in all; a load asks for the first n it needs. Answers are
generated greedily with the teacher's chat template and cached per prompt in
`cache_dir/chat/<key>.jsonl`, key = sha256(teacher hash, tokenizer vocab hash, max_new_tokens),
so no prompt is ever answered twice and a larger load only answers the new prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from rich.progress import Progress

from xmerge.errors import XmergeError
from xmerge.evals.generation import left_padded

CHAT_PROMPTS: tuple[str, ...] = (
    "Explain why the sky looks blue during the day.",
    "Give three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Write a short poem about a rainy afternoon.",
    "How do I boil an egg so the yolk stays soft?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What does a compiler do?",
    "Suggest a name for a small bakery that sells bread and coffee.",
    "Explain photosynthesis to a ten-year-old.",
    "List five fruits that are high in vitamin C.",
    "How can I politely decline an invitation to a party?",
    "What is the capital of Canada, and why was it chosen?",
    "Write a haiku about the ocean.",
    "Describe how a bicycle stays upright when it moves.",
    "What are the main causes of inflation?",
    "Give me a simple recipe for tomato soup.",
    "Explain what a prime number is with two examples.",
    "How should I prepare for a job interview?",
    "Translate 'Good morning, how are you?' into French.",
    "What is the difference between a list and a tuple in Python?",
    "Write a two-sentence horror story.",
    "Why do we have leap years?",
    "Explain the rules of tic-tac-toe.",
    "What are some ways to reduce plastic waste at home?",
    "Describe the water cycle in simple steps.",
    "Write a thank-you note to a teacher.",
    "What is machine learning, in one paragraph?",
    "How does a refrigerator keep food cold?",
    "Give three arguments for learning a second language.",
    "What happens when you mix baking soda and vinegar?",
    "Explain what a function is in mathematics.",
    "Write a short story opening about a lost key.",
    "How do vaccines help the body fight disease?",
    "What is the tallest mountain in the world, and where is it?",
    "Suggest a weekend plan for someone who likes hiking.",
    "Explain the difference between speed and velocity.",
    "Write a product description for a reusable water bottle.",
    "What are the planets of the solar system, in order?",
    "How do I make a good first impression at a new job?",
    "Explain what recursion is and give a tiny example.",
    "Why do leaves change color in autumn?",
    "Write a limerick about a cat who loves cheese.",
    "What is the purpose of a budget, and how do I start one?",
    "Describe the taste of a lemon to someone who has never had one.",
    "Explain how a rainbow forms.",
    "Give five ideas for a child's birthday party.",
    "What is the difference between an atom and a molecule?",
    "How do I write a clear email to ask for a deadline extension?",
    "Explain the idea of supply and demand.",
    "Write a motivational message for someone starting to run.",
    "What are good habits for healthy sleep?",
    "How does the internet send a message from one computer to another?",
    "Explain what the Pythagorean theorem says.",
    "Write a short dialogue between a robot and a gardener.",
    "What were the main effects of the printing press?",
    "How can I keep houseplants alive?",
    "Explain what a noun, a verb and an adjective are.",
    "Give a brief history of the bicycle.",
    "What is a black hole?",
    "Write a four-line poem about friendship.",
    "How do I calculate the average of a list of numbers?",
    "Explain why exercise is good for the brain.",
    "Describe a typical day of a lighthouse keeper.",
    "What is the difference between a virus and a bacterium?",
    "Suggest three board games for a family evening.",
    "Explain how to change a flat tire on a car.",
    "What does 'opportunity cost' mean?",
    "Write a riddle and give its answer.",
    "How do bees make honey?",
    "Explain what an API is using a restaurant analogy.",
    "What are the benefits of reading every day?",
    "Describe the smell of a forest after rain.",
    "How do I convert Celsius to Fahrenheit?",
    "Explain why the moon has phases.",
    "Write a short speech for a friend's wedding toast.",
    "What is the difference between renewable and non-renewable energy?",
    "How can a team resolve a disagreement calmly?",
    "Explain what a sorting algorithm does, with one example.",
    "Give three facts about octopuses.",
    "Write a short review of an imaginary restaurant.",
    "What is democracy?",
    "How do I start learning to play the guitar?",
    "Explain why ice floats on water.",
    "Describe the steps to plant a tree.",
    "What is the role of the heart in the human body?",
    "Write an apology message for missing a meeting.",
    "Explain what a percentage is with an example.",
    "What are the main differences between cats and dogs as pets?",
    "How do airplanes stay in the air?",
    "Give some advice to a student who feels stressed before exams.",
    "Explain what a variable is in programming.",
    "Write a bedtime story about a sleepy dragon in three sentences.",
    "What causes earthquakes?",
    "How can I save money on groceries?",
    "Explain the difference between 'affect' and 'effect'.",
    "Describe what a museum curator does.",
    "What is the greenhouse effect?",
    "Write a short letter to your future self.",
    "How does a battery store energy?",
    "Give three ways to be kinder to strangers.",
    "Explain what a fraction is to a child.",
    "What are the first steps to start a vegetable garden?",
    "Why is the ocean salty?",
    "Write a slogan for a library reading program.",
    "Explain the difference between RAM and storage in a computer.",
    "How do I tie a simple knot to secure a boat?",
    "What is the role of a referee in a football match?",
    "Describe the life cycle of a butterfly.",
    "Write instructions for making a paper airplane.",
    "What is a metaphor? Give an example.",
    "How can I improve my handwriting?",
    "Explain why we see lightning before we hear thunder.",
    "Give a short overview of the Roman Empire.",
    "What should I pack for a three-day camping trip?",
    "Explain how compound interest works.",
    "Write a cheerful message for a coworker's birthday.",
    "What is the difference between a lake and a sea?",
    "How do I stay safe when swimming in the sea?",
    "Explain what a hash function is in simple terms.",
    "Describe a sunset over a city in one paragraph.",
)
HELDOUT_PERCENT = 20  # a fifth keeps the held-out split of the first prompts fillable

TEMPLATES: tuple[str, ...] = (
    "Explain {} to a beginner.",
    "Give three interesting facts about {}.",
    "Write a short poem about {}.",
    "What are the pros and cons of {}?",
    "Summarize the history of {} in one paragraph.",
    "How would you teach a child about {}?",
    "Write a short story that involves {}.",
    "What are common misconceptions about {}?",
    "Describe {} in five sentences.",
    "Give me a step-by-step guide to getting started with {}.",
    "Why does {} matter in everyday life?",
    "Compare {} with something similar and explain the difference.",
    "Write a friendly email inviting a colleague to learn about {}.",
    "List five questions a student might ask about {}, with short answers.",
    "What would the world look like without {}?",
    "Write a dialogue between two friends discussing {}.",
    "What are the main ideas behind {}?",
    "Give a practical tip related to {}.",
    "Write a tweet-length summary of {}.",
    "What careers are connected to {}?",
    "Create a short quiz with three questions about {}.",
    "Explain {} using an analogy.",
    "What is the future of {}?",
    "Write a haiku about {}.",
    "Describe a typical day of someone who works with {}.",
)
TOPICS: tuple[str, ...] = (
    "volcanoes", "the immune system", "chess", "coffee", "electric cars", "the moon", "honeybees",
    "rainforests", "the stock market", "jazz music", "bread baking", "solar panels", "the French Revolution",
    "recycling", "public libraries", "earthquakes", "the human heart", "video games", "gardening",
    "the Olympic Games", "dinosaurs", "cloud computing", "friendship", "the Great Wall of China",
    "origami", "sleep", "penguins", "the printing press", "meditation", "bridges", "tea ceremonies",
    "the Amazon river", "photography", "vaccines", "trains", "the periodic table", "kindness",
    "deserts", "programming languages", "the violin", "wind energy", "ancient Egypt", "mushrooms",
    "time management", "the ocean tides", "bicycles", "museums", "the internet", "glaciers",
    "board games", "whales", "democracy", "spices", "robots", "the night sky", "marathons",
    "coral reefs", "handwriting", "birds migrating", "renewable energy", "pottery", "the Renaissance",
    "rain", "budgeting", "volunteering", "the camera obscura", "maps", "honey", "skyscrapers",
    "the water cycle", "learning a language", "chocolate", "the Silk Road", "libraries of the future",
    "owls", "soap", "the telescope", "folk tales", "composting", "airplanes", "mathematics",
    "the seasons", "snowflakes", "theatre", "the human brain", "knitting", "lighthouses",
    "fermentation", "space stations", "clean water", "teamwork", "castles", "bamboo", "the postal service",
    "magnets", "puzzles", "climate change", "street food", "the alphabet", "wolves",
)


def _templated() -> list[str]:
    prompts = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    return sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())  # mixes templates and topics


ALL_PROMPTS: tuple[str, ...] = CHAT_PROMPTS + tuple(_templated())


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """`messages` rendered with the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise XmergeError("the tokenizer has no chat template, so chat 'messages' cannot be rendered; "
                          "use records with a 'text' field or a tokenizer that ships a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@torch.inference_mode()
def answer_prompts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64,
                   progress: bool = True) -> list[str]:
    """Greedy answers of `model` to each prompt, asked through its chat template.

    Large batches matter on CPU: SmolLM2-135M answered the 120 prompts (128 new tokens) in
    ~9 min at batch 60 on 2 busy cores, and had not finished after 18 min at batch 16.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("teacher answers chat prompts", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = [render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in batch]
            input_ids, attention_mask = left_padded(ids, pad_id)  # works without a pad token (GGUF tokenizers)
            enc = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.advance(task, len(batch))
    return answers


def chat_conversations(model, tokenizer, prompts: list[str], *, cache_dir: Path, teacher_hash: str,
                       tokenizer_hash: str, max_new_tokens: int = 128, progress: bool = True) -> list[dict]:
    """[{prompt, answer}] for `prompts`: cached answers are read, only the others are generated (then cached)."""
    key = hashlib.sha256(json.dumps(["chat/v2", teacher_hash, tokenizer_hash, max_new_tokens]).encode()).hexdigest()
    path = Path(cache_dir) / "chat" / f"{key}.jsonl"
    known = {}
    if path.exists():
        known = {r["prompt"]: r["answer"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    if missing:
        on_gpu = next(model.parameters()).device.type == "cuda"
        answers = answer_prompts(model, tokenizer, missing, max_new_tokens=max_new_tokens,
                                 batch_size=256 if on_gpu else 64, progress=progress)
        known.update(zip(missing, answers))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n"
                               for p, a in known.items()), encoding="utf-8")
        os.replace(tmp, path)
    return [{"prompt": p, "answer": known[p]} for p in prompts]
