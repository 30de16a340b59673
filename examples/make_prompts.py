"""Generate examples/prompts.jsonl: prompts as backend services send them.

A handful of templates and system prompts, filled with varied content, across
priorities, some with deadlines. Deterministic: ``python examples/make_prompts.py``
rewrites the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUPPORT_SYSTEM = (
    "You are the support assistant of Northwind Cloud Storage. Answer the customer's "
    "question in at most three sentences. Be friendly and precise. Facts you may use: "
    "Plans: Free (15 GB), Plus (200 GB, $2.99/month), Pro (2 TB, $9.99/month), Business "
    "(unlimited seats, 5 TB pooled per seat, $15 per seat/month). Files in the trash are "
    "kept 30 days. Version history: 30 days on Free and Plus, 180 days on Pro and "
    "Business. Shared links can expire and can require a password on Pro and Business. "
    "Two-factor authentication supports authenticator apps and hardware keys. Refunds: "
    "within 14 days of a charge, on request. Data centres: Frankfurt, Dublin, Virginia, "
    "Oregon, Singapore; Business customers choose the region. Never promise features that "
    "are not listed here; if unsure, offer to open a ticket."
)
SUPPORT_QUESTIONS = [
    "How long do deleted files stay in the trash?",
    "Can I password-protect a shared link on the Plus plan?",
    "I was charged twice this month, can I get a refund?",
    "How do I turn on two-factor authentication with a YubiKey?",
    "What happens to my files if I downgrade from Pro to Free?",
    "Can I keep my company's data in Europe only?",
    "How far back can I restore an older version of a spreadsheet?",
    "Is there a student discount?",
    "My upload is stuck at 99%, what should I do?",
    "How much storage does each Business seat get?",
    "Can I share a folder with someone who has no account?",
    "Do you support SSO with Okta?",
]

SQL_SCHEMA = (
    "Given this PostgreSQL schema:\n"
    "CREATE TABLE customers (id bigint primary key, name text, country text, created_at "
    "timestamptz);\n"
    "CREATE TABLE orders (id bigint primary key, customer_id bigint references "
    "customers(id), total_cents integer, status text check (status in ('paid','refunded',"
    "'pending')), created_at timestamptz);\n"
    "CREATE TABLE order_items (order_id bigint references orders(id), sku text, quantity "
    "integer, unit_cents integer);\n"
    "CREATE TABLE products (sku text primary key, title text, category text);\n"
    "Write one SQL query, and nothing else, that answers: "
)
SQL_QUESTIONS = [
    "the ten customers with the highest total paid amount in 2025",
    "the number of refunded orders per country",
    "the average order value per month over the last year",
    "products that were never ordered",
    "the share of pending orders older than seven days",
    "the best-selling category by quantity in each country",
    "customers whose first order was refunded",
    "daily revenue for the last 30 days, including days without orders",
]

REVIEW_PREFIX = ("Summarize the following product review in one sentence, keeping the "
                 "reviewer's verdict:\n\n")
PRODUCTS = ["wireless earbuds", "standing desk", "espresso machine", "trail running shoes",
            "4K monitor", "robot vacuum", "mechanical keyboard", "air purifier",
            "electric kettle", "camping tent"]
PROS = ["battery lasts all week", "setup took five minutes", "it is very quiet",
        "build quality feels premium", "the app is well designed", "it was cheap for what you get",
        "customer service replaced a faulty part fast", "it looks great on my desk"]
CONS = ["the manual is useless", "it scratches easily", "shipping took three weeks",
        "the cable is far too short", "it gets hot after an hour", "the lid rattles",
        "firmware updates broke a feature", "the colour differs from the photos"]

VERDICTS = ["I would buy it again", "I am returning it", "it is fine for the price"]

SENTIMENT_PREFIX = ("Classify the sentiment of this message as positive, negative or neutral. "
                    "Answer with one word.\n\nMessage: ")
MESSAGES = ["Just got my order and it's perfect!", "Third delay this week, I'm done.",
            "The store opens at 9 tomorrow.", "Honestly the best support chat I've had.",
            "Why does the app log me out every hour?", "Package arrived, box was a bit dented.",
            "Loving the new dark mode", "Refund still not processed after 20 days",
            "Meeting moved to Thursday.", "This update made everything slower."]

TRANSLATE_PREFIX = "Translate the following English text to French. Keep the formatting.\n\n"
SENTENCES = ["Your order has shipped and will arrive on Monday.",
             "Please reset your password using the link below.",
             "Our office is closed for the public holiday.",
             "Thank you for your feedback, we will look into it.",
             "The invoice is attached to this email.",
             "Your subscription renews on the first of each month.",
             "We could not process your payment.",
             "The meeting has been moved to 3 pm."]

FREEFORM = ["What is the capital of Australia?", "Explain TCP slow start in two sentences.",
            "Give me a regex that matches ISO 8601 dates.",
            "What does HTTP status 429 mean?", "Suggest a name for a pet tortoise.",
            "How many seconds are in a leap year?"]


def build(rng: random.Random) -> list[dict[str, object]]:
    """The example prompts, shuffled the way requests from many services interleave."""
    rows: list[dict[str, object]] = []
    for i in range(120):
        q = rng.choice(SUPPORT_QUESTIONS)
        rows.append({"id": f"support-{i}", "messages": [
            {"role": "system", "content": SUPPORT_SYSTEM},
            {"role": "user", "content": f"{q} (ticket #{4100 + i})"}],
            "priority": rng.choice(["high", "high", "normal"]), "timeout_s": 120,
            "params": {"max_tokens": 96, "temperature": 0.2}, "tenant": "support-bot"})
    for i in range(60):
        rows.append({"id": f"sql-{i}", "prompt": SQL_SCHEMA + rng.choice(SQL_QUESTIONS) + ".",
                     "priority": "normal", "params": {"max_tokens": 128, "temperature": 0},
                     "tenant": "analytics"})
    for i in range(80):
        product = rng.choice(PRODUCTS)
        review = (f"I bought the {product} a month ago. {rng.choice(PROS).capitalize()}, and "
                  f"{rng.choice(PROS)}. On the other hand, {rng.choice(CONS)}. "
                  f"Overall {rng.choice(VERDICTS)}.")
        rows.append({"id": f"review-{i}", "prompt": REVIEW_PREFIX + review, "priority": "low",
                     "params": {"max_tokens": 48}, "tenant": "catalog"})
    for i in range(100):
        rows.append({"id": f"sentiment-{i}", "prompt": SENTIMENT_PREFIX + rng.choice(MESSAGES),
                     "priority": "bulk", "params": {"max_tokens": 4, "temperature": 0},
                     "tenant": "catalog"})
    for i in range(60):
        rows.append({"id": f"translate-{i}", "prompt": TRANSLATE_PREFIX + rng.choice(SENTENCES),
                     "priority": "bulk", "params": {"max_tokens": 64}, "tenant": "localization"})
    for i in range(20):
        rows.append({"id": f"chat-{i}", "prompt": rng.choice(FREEFORM), "priority": "critical",
                     "timeout_s": 60, "params": {"max_tokens": 64}, "tenant": "assistant"})
    rng.shuffle(rows)
    return rows


def main() -> None:
    """Write examples/prompts.jsonl next to this script."""
    out = Path(__file__).with_name("prompts.jsonl")
    rows = build(random.Random(7))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {out}")


if __name__ == "__main__":
    main()
