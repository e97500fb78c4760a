"""Stage 4, evaluate: answer labels (labels, refusal_markers), greedy answers (answers), first-token and answer KL
against a base model (kl), rates with Wilson intervals (intervals), label agreement (agreement), an optional judge
model (judge), the tables (report), one model's evaluation (model_eval), labelling a file of given answers
(answers_file), and the streaming chat engine behind chat.py (chat_engine)."""
