"""Synthetic customer-support tickets with known fields: the distillation example's task.

Each ticket is a short message written in one of several voices about one of five problems;
the fields to extract are the customer's name, the order id, the product and the category.
The generator is seeded, so a run's training and held-out tickets are reproducible, and the
two sets share no ticket (held-out tickets are drawn after the training ones and checked).
"""

import random

CATEGORIES = ["refund", "late_delivery", "damaged", "wrong_item", "billing"]

FIRST = ["Maria", "James", "Aiko", "Olivia", "Rahul", "Sofia", "Liam", "Chen", "Fatima", "Noah",
         "Elena", "Kwame", "Hannah", "Diego", "Priya", "Lucas", "Amara", "Jonas", "Mei", "Omar",
         "Clara", "Tomasz", "Yuki", "Isabel", "Ethan", "Nadia", "Felix", "Leila", "Samuel", "Ingrid"]
LAST = ["Gomez", "Smith", "Tanaka", "Brown", "Patel", "Rossi", "Murphy", "Wang", "Haddad", "Miller",
        "Petrova", "Mensah", "Schmidt", "Alvarez", "Sharma", "Moreau", "Okafor", "Berg", "Lin",
        "Khalil", "Weber", "Nowak", "Sato", "Costa", "Clarke", "Ivanova", "Fischer", "Rahimi",
        "Adeyemi", "Larsen"]
PRODUCTS = ["wireless earbuds", "coffee grinder", "yoga mat", "desk lamp", "phone case",
            "electric kettle", "running shoes", "backpack", "bluetooth speaker", "air fryer",
            "mechanical keyboard", "water bottle", "winter jacket", "smart watch", "blender",
            "office chair", "hair dryer", "camping tent", "gaming mouse", "wool blanket",
            "toaster", "sunglasses", "laptop stand", "baby monitor", "rice cooker"]

# Each problem in several voices; {name}, {order} and {product} are filled in.
TEMPLATES = {
    "refund": [
        "Hi, I'm {name}. I'd like my money back for the {product} from order {order}, I changed my mind.",
        "Order {order}: please refund the {product}. I no longer need it. Thanks, {name}",
        "Hello support, {name} here. Can I return the {product} (order {order}) and get a refund?",
        "I want a refund for order {order}. The {product} is not what I expected. Regards, {name}.",
    ],
    "late_delivery": [
        "Hi, this is {name}. My {product} from order {order} still hasn't arrived, it's two weeks late.",
        "Where is my package? Order {order}, a {product}, was due last Monday. - {name}",
        "Hello, {name} writing. Tracking for order {order} hasn't moved in days and I need the {product}.",
        "Order {order} ({product}) is very late. Please tell me when it will be delivered. {name}",
    ],
    "damaged": [
        "Hi, I'm {name}. The {product} in order {order} arrived broken, the box was crushed.",
        "My {product} came damaged (order {order}). It has a big crack. Regards, {name}",
        "Hello, {name} here. Order {order}: the {product} stopped working after one day, it's defective.",
        "The {product} I got with order {order} is scratched and dented. Please help. {name}",
    ],
    "wrong_item": [
        "Hi, this is {name}. I ordered a {product} (order {order}) but you sent me something else.",
        "Order {order} contained the wrong item, not the {product} I paid for. - {name}",
        "Hello support, {name} here. Instead of the {product} from order {order} I received a different product.",
        "You shipped the wrong thing for order {order}. Where is my {product}? Thanks, {name}.",
    ],
    "billing": [
        "Hi, I'm {name}. I was charged twice for the {product}, order {order}. Please fix my bill.",
        "Order {order}: my card was billed the wrong amount for the {product}. Regards, {name}",
        "Hello, {name} writing. The invoice for order {order} ({product}) shows a fee I did not agree to.",
        "There is an extra charge on my statement for order {order}, the {product}. Please check. {name}",
    ],
}

SYSTEM = ("Extract the fields of the customer's support ticket as JSON: name (the customer's "
          "full name), order_id (as written), product, and category, one of: refund (they want "
          "their money back), late_delivery (not arrived yet), damaged (broken or defective), "
          "wrong_item (a different item was sent), billing (a wrong charge).")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "order_id": {"type": "string"},
        "product": {"type": "string"},
        "category": {"type": "string", "enum": CATEGORIES},
    },
    "required": ["name", "order_id", "product", "category"],
    "additionalProperties": False,
}

RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "ticket_fields", "strict": True, "schema": SCHEMA}}


def ticket(rng: random.Random) -> dict:
    """One ticket: its text and the true fields."""
    category = rng.choice(CATEGORIES)
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    order = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(10000, 99999)}"
    product = rng.choice(PRODUCTS)
    text = rng.choice(TEMPLATES[category]).format(name=name, order=order, product=product)
    return {"ticket": text, "name": name, "order_id": order, "product": product,
            "category": category}


def split(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out tickets, disjoint (no held-out text appears in training)."""
    rng = random.Random(seed)
    train = [ticket(rng) for _ in range(n_train)]
    seen = {t["ticket"] for t in train}
    heldout: list[dict] = []
    while len(heldout) < n_heldout:
        t = ticket(rng)
        if t["ticket"] not in seen:
            seen.add(t["ticket"])
            heldout.append(t)
    return train, heldout
