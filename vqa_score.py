"""The official VQA v2 accuracy, as the VQA v2 evaluation script vqaEval.py computes it, step for step:
https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py
The prediction is normalised fully (processPunctuation, then processDigitArticle); the annotators'
answers only get processPunctuation, and only when they are not all the same string. eval.py scores
with it (METHOD.md §7.2); the tables of the official script are not needed to read the method.
"""
import re

NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # manualMap
ARTICLES = {"a", "an", "the"}
# the official contraction table: its 75 single contractions keyed by the form without apostrophes ...
CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
    "how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
    "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll "
    "that's there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's "
    "won't would've wouldn't y'all you'd you'll you're you've").split()}
# ... and its 45 other entries as they are: double contractions keyed by the forms missing one apostrophe,
# two identities, "somebody'd" mapped the wrong way round, and capitalised keys that never match (the words
# are lowercased first)
CONTRACTIONS.update({
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hed've": "he'd've", "he'dve": "he'd've", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "itd've": "it'd've", "it'dve": "it'd've", "let's": "let's", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "somethingd've": "something'd've", "something'dve": "something'd've", "thered've": "there'd've",
    "there'dve": "there'd've", "theyd've": "they'd've", "they'dve": "they'd've", "wed've": "we'd've",
    "we'dve": "we'd've", "whod've": "who'd've", "who'dve": "who'd've", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd've": "you'd've", "you'dve": "you'd've"})
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")  # commaStrip
# periodStrip as written: its look-behind is mistyped ("(?!<=" is a look-ahead for "<="), so in effect it
# strips every period not followed by a digit ("3.5" stays, "5." and "dog." lose theirs)
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def process_punctuation(s):
    """vqaEval.processPunctuation. Each mark is deleted when, in the ORIGINAL string, it touches a space
    or a comma sits between digits ("1,000"), else replaced by a space ("t-shirt" -> "t shirt"). Then
    periods not followed by a digit go, at most 32: the script passes re.UNICODE (32) where sub() takes
    its count."""
    out, delete = s, COMMA_DIGITS.search(s) is not None
    for p in PUNCT:
        out = out.replace(p, "" if delete or p + " " in s or " " + p in s else " ")
    return PERIOD.sub("", out, count=32)


def process_digit_article(s):
    """vqaEval.processDigitArticle: lowercase, number words to digits, articles dropped, then contractions."""
    words = [NUMBERS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(s):
    """An answer normalised as the official evaluation normalises a prediction: newlines and tabs to
    spaces, strip, punctuation, lowercase, number words, articles, contractions. Also what the answer
    list and the training targets are built from (build_answer_vocab, soft_targets)."""
    return process_digit_article(process_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(pred, answers):
    """Official VQA accuracy of one prediction against the annotators' answers, in [0, 1]: the mean over
    the leave-one-annotator-out subsets of min(1, matches / 3). As in vqaEval.py, the prediction is
    normalised fully but the answers are compared as given, or only punctuation-processed when they
    disagree: "t shirt" scores 0 against ten "t-shirt", "2" scores 0 against "two"."""
    if not answers:
        raise ValueError("no annotator answers to score against")
    pred = normalize_answer(pred)
    gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else answers
    hits = [a == pred for a in gts]
    m = sum(hits)
    return sum(min(1.0, (m - h) / 3) for h in hits) / len(hits)
