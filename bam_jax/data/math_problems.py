"""Deterministic worked arithmetic and algebra problems: the `math` corpus.

Every problem is a function of its index alone: the random draws come from
sha256 of the index, so the corpus is identical on every machine and Python
version. A document holds PROBLEMS_PER_DOCUMENT consecutive problems, blank
lines between them. A problem reads

    Problem: Compute 4821 + 397.
    Solution:
    Ones column: 1 + 7 + 0 = 8
    ...
    Answer: 5218

Arithmetic claims in the solution are written as `<expression> = <value>`
either at the start of a line or after `: `, so they can be checked
mechanically; the last line is always `Answer: <value>`.
"""

import fractions
import hashlib
import math

_KINDS = ('add', 'subtract', 'multiply', 'divide', 'linear', 'linear_both',
          'fraction', 'percent_of', 'percent_change', 'system')
_VARIABLES = ('x', 'y', 'n', 't')
PROBLEMS_PER_DOCUMENT = 6


class _Draws:
    """Integers drawn from sha256(index, counter): platform-independent."""

    def __init__(self, index):
        self._key = f'bam-math/{index}/'.encode()
        self._count = 0

    def integer(self, low, high):
        """A uniform-enough integer in [low, high] (bias < 2**-40)."""
        digest = hashlib.sha256(self._key + str(self._count).encode()).digest()
        self._count += 1
        return low + int.from_bytes(digest[:8], 'big') % (high - low + 1)

    def nonzero(self, low, high):
        value = 0
        while value == 0:
            value = self.integer(low, high)
        return value

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]


def _digits(value):
    """Decimal digits of a non-negative int, ones first."""
    return [int(d) for d in reversed(str(value))]


_PLACES = ('Ones', 'Tens', 'Hundreds', 'Thousands', 'Ten-thousands',
           'Hundred-thousands', 'Millions')


def _add(draw):
    terms = [draw.integer(10, 99999) for _ in range(draw.integer(2, 3))]
    total = sum(terms)
    lines = ['Line the numbers up and add column by column, from the ones.']
    columns = [_digits(t) for t in terms]
    carry = 0
    for place in range(len(str(max(terms)))):
        column = [d[place] for d in columns if place < len(d)]
        column_sum = sum(column) + carry
        expr = ' + '.join(str(d) for d in column + [carry])
        lines.append(f'{_PLACES[place]} column: {expr} = {column_sum}')
        carry = column_sum // 10
        lines.append(f'Write {column_sum % 10} and carry {carry}.')
    if carry:
        lines.append(f'Write the final carry {carry} in front.')
    question = ' + '.join(str(t) for t in terms)
    lines.append(f'So {question} = {total}.')
    return f'Compute {question}.', lines, str(total)


def _subtract(draw):
    a, b = draw.integer(100, 99999), draw.integer(10, 9999)
    a, b = max(a, b), min(a, b)
    lines = ['Line the numbers up and subtract column by column, from the '
             + 'ones.']
    top, bottom = _digits(a), _digits(b)
    borrow = 0
    for place in range(len(top)):
        low = bottom[place] if place < len(bottom) else 0
        value = top[place] - borrow - low
        name = _PLACES[place]
        if value < 0:
            lines.append(f'{name} column: {top[place]} - {borrow} - {low} is '
                         f'negative, so borrow 10.')
            lines.append(f'{name} column: {top[place] + 10} - {borrow} - '
                         f'{low} = {value + 10}')
            borrow = 1
        else:
            lines.append(f'{name} column: {top[place]} - {borrow} - {low} = '
                         f'{value}')
            borrow = 0
    lines.append(f'So {a} - {b} = {a - b}.')
    return f'Compute {a} - {b}.', lines, str(a - b)


def _multiply(draw):
    a, b = draw.integer(12, 9999), draw.integer(12, 999)
    lines = [f'Multiply {a} by each digit of {b}; add the partial products.']
    partials = []
    for place, digit in enumerate(_digits(b)):
        factor = digit * 10 ** place
        partials.append(a * factor)
        lines.append(f'Partial product: {a} * {factor} = {a * factor}')
    sum_expr = ' + '.join(str(p) for p in partials)
    lines.append(f'Add them: {sum_expr} = {a * b}')
    return f'Compute {a} * {b}.', lines, str(a * b)


def _divide(draw):
    b = draw.integer(3, 97)
    a = draw.integer(b * 10, 99999)
    lines = [f'Use long division of {a} by {b}, one digit at a time.']
    current, quotient = 0, 0
    for digit in str(a):
        current = current * 10 + int(digit)
        step = current // b
        quotient = quotient * 10 + step
        lines.append(f'Bring down {digit} to get {current}; {b} goes into it '
                     f'{step} times: {b} * {step} = {b * step}')
        remainder = current - b * step
        lines.append(f'Remainder: {current} - {b * step} = {remainder}')
        current = remainder
    lines.append(f'Check: {b} * {quotient} + {current} = {a}')
    answer = f'{quotient} remainder {current}'
    return f'Divide {a} by {b}.', lines, answer


def _term(coefficient, variable):
    """'3x', 'x', '-x', '-3x'."""
    if coefficient == 1:
        return variable
    if coefficient == -1:
        return f'-{variable}'
    return f'{coefficient}{variable}'


def _side(coefficient, variable, constant):
    """'3x + 4', '3x - 4' or '3x'."""
    text = _term(coefficient, variable)
    if constant > 0:
        return f'{text} + {constant}'
    if constant < 0:
        return f'{text} - {-constant}'
    return text


def _move_constant(lines, constant, right):
    """Step that takes `constant` off the left side; returns the new right."""
    if constant > 0:
        lines.append(f'Subtract {constant} from both sides: '
                     f'{right} - {constant} = {right - constant}')
    elif constant < 0:
        lines.append(f'Add {-constant} to both sides: '
                     f'{right} + {-constant} = {right - constant}')
    return right - constant


def _linear(draw):
    var = draw.choice(_VARIABLES)
    a, x = draw.nonzero(-12, 12), draw.integer(-20, 20)
    b = draw.nonzero(-50, 50)
    c = a * x + b
    lines = []
    right = _move_constant(lines, b, c)
    lines.append(f'Now {_term(a, var)} = {right}.')
    if a != 1:
        lines.append(f'Divide both sides by {a}: {right} / {a} = {x}')
    lines.append(f'So {var} = {x}.')
    lines.append(f'Check: {a} * {x} + {b} = {c}')
    return f'Solve for {var}: {_side(a, var, b)} = {c}.', lines, f'{var} = {x}'


def _linear_both(draw):
    var = draw.choice(_VARIABLES)
    a, d = draw.nonzero(-12, 12), draw.nonzero(-12, 12)
    while d == a:
        d = draw.nonzero(-12, 12)
    x, b = draw.integer(-20, 20), draw.integer(-50, 50)
    e = (a - d) * x + b
    question = f'{_side(a, var, b)} = {_side(d, var, e)}'
    lines = [f'Collect the {var} terms on the left: {a} - {d} = {a - d}']
    lines.append(f'This gives {_side(a - d, var, b)} = {e}.')
    right = _move_constant(lines, b, e)
    if a - d != 1:
        lines.append(f'Divide both sides by {a - d}: {right} / {a - d} = {x}')
    lines.append(f'So {var} = {x}.')
    lines.append(f'Check the left side: {a} * {x} + {b} = {a * x + b}')
    lines.append(f'Check the right side: {d} * {x} + {e} = {d * x + e}')
    return f'Solve for {var}: {question}.', lines, f'{var} = {x}'


def _fraction_text(value):
    """'5/6', '-7/12' or '3' for an integer value."""
    value = fractions.Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    return f'{value.numerator}/{value.denominator}'


def _fraction(draw):
    p, q = draw.integer(1, 11), draw.integer(2, 12)
    r, s = draw.integer(1, 11), draw.integer(2, 12)
    op = draw.choice(('+', '-', '*', '/'))
    lines = []
    if op in '+-':
        lcd = q * s // math.gcd(q, s)
        lines.append(f'The least common denominator of {q} and {s} is {lcd}.')
        left, right = p * (lcd // q), r * (lcd // s)
        lines.append(f'Rewrite the first fraction: {p}/{q} = {left}/{lcd}')
        lines.append(f'Rewrite the second fraction: {r}/{s} = {right}/{lcd}')
        numerator = left + right if op == '+' else left - right
        lines.append(f'Combine: {left}/{lcd} {op} {right}/{lcd} = '
                     f'{numerator}/{lcd}')
        denominator = lcd
        question = f'{p}/{q} {op} {r}/{s}'
    elif op == '*':
        numerator, denominator = p * r, q * s
        lines.append(f'Multiply the numerators and the denominators: '
                     f'{p}/{q} * {r}/{s} = {numerator}/{denominator}')
        question = f'{p}/{q} * {r}/{s}'
    else:
        numerator, denominator = p * s, q * r
        lines.append(f'Dividing by {r}/{s} means multiplying by {s}/{r}: '
                     f'({p}/{q}) * ({s}/{r}) = {numerator}/{denominator}')
        question = f'({p}/{q}) / ({r}/{s})'
    common = math.gcd(numerator, denominator)
    result = fractions.Fraction(numerator, denominator)
    if common > 1:
        lines.append(f'Divide the numerator and the denominator by {common}: '
                     f'{numerator}/{denominator} = {_fraction_text(result)}')
    else:
        lines.append(f'{numerator}/{denominator} is already in lowest terms.')
    return (f'Compute {question} in lowest terms.', lines,
            _fraction_text(result))


def _decimal_text(value):
    """Exact decimal text of a Fraction whose denominator divides 100."""
    value = fractions.Fraction(value)
    cents = value * 100
    assert cents.denominator == 1, value
    sign = '-' if cents < 0 else ''
    whole, rest = divmod(abs(cents.numerator), 100)
    if rest == 0:
        return f'{sign}{whole}'
    return f'{sign}{whole}.{rest:02d}'.rstrip('0')


def _percent_of(draw):
    percent, amount = draw.integer(1, 150), draw.integer(2, 2000)
    value = fractions.Fraction(percent * amount, 100)
    lines = [
        f'{percent}% means {percent} hundredths: multiply, then divide.',
        f'Multiply: {percent} * {amount} = {percent * amount}',
        f'Divide by 100: {percent * amount} / 100 = {_decimal_text(value)}',
    ]
    return (f'What is {percent}% of {amount}?', lines, _decimal_text(value))


def _percent_change(draw):
    old = 20 * draw.integer(1, 50)
    percent = 5 * draw.nonzero(-19, 30)
    new = old + old * percent // 100
    word = 'increase' if percent > 0 else 'decrease'
    verb = 'rises' if percent > 0 else 'falls'
    change = abs(new - old)
    lines = [
        (f'The change is the difference: {max(new, old)} - {min(new, old)} '
         f'= {change}'),
        (f'Divide by the original amount and multiply by 100: '
         f'{change} / {old} * 100 = {abs(percent)}'),
    ]
    question = (f'A price {verb} from {old} to {new}. What is the percentage '
                f'{word}?')
    return question, lines, f'{abs(percent)}%'


def _system(draw):
    x, y = draw.integer(-10, 10), draw.integer(-10, 10)
    a1, b1, a2, b2 = (draw.nonzero(-9, 9) for _ in range(4))
    while a1 * b2 - a2 * b1 == 0:
        b2 = draw.nonzero(-9, 9)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    eq1 = f'{_term(a1, "x")} {"+" if b1 > 0 else "-"} {_term(abs(b1), "y")}'
    eq2 = f'{_term(a2, "x")} {"+" if b2 > 0 else "-"} {_term(abs(b2), "y")}'
    coefficient = a2 * b1 - a1 * b2
    constant = a2 * c1 - a1 * c2
    lines = [
        (f'Eliminate x: multiply the first equation by {a2} and the second '
         f'by {a1}, then subtract.'),
        f'Coefficient of y: {a2} * {b1} - {a1} * {b2} = {coefficient}',
        f'Right-hand side: {a2} * {c1} - {a1} * {c2} = {constant}',
        f'Solve for y: {constant} / {coefficient} = {y}',
        (f'Substitute y into the first equation: {c1} - {b1} * {y} = '
         f'{c1 - b1 * y}'),
        f'Solve for x: {c1 - b1 * y} / {a1} = {x}',
        f'Check the second equation: {a2} * {x} + {b2} * {y} = {c2}',
    ]
    question = f'Solve the system: {eq1} = {c1} and {eq2} = {c2}.'
    return question, lines, f'x = {x}, y = {y}'


_BUILDERS = {'add': _add, 'subtract': _subtract, 'multiply': _multiply,
             'divide': _divide, 'linear': _linear, 'linear_both': _linear_both,
             'fraction': _fraction, 'percent_of': _percent_of,
             'percent_change': _percent_change, 'system': _system}


def problem_kind(index):
    """Which kind of problem document `index` holds (round robin)."""
    return _KINDS[index % len(_KINDS)]


def problem(index):
    """The text of math document `index`: problem, worked steps, answer."""
    if index < 0:
        raise ValueError(f'math document index must be >= 0, got {index}')
    question, lines, answer = _BUILDERS[problem_kind(index)](_Draws(index))
    return '\n'.join([f'Problem: {question}', 'Solution:', *lines,
                      f'Answer: {answer}'])


def problems(count):
    """Texts of problems 0..count-1."""
    return [problem(i) for i in range(count)]


def document(index):
    """Math document `index`: a worksheet of problems
    PROBLEMS_PER_DOCUMENT * index, ... (about 2 kB, like the other domains'
    documents, so a mixture's share of sequences is close to its share of
    tokens)."""
    first = index * PROBLEMS_PER_DOCUMENT
    return '\n\n'.join(problem(i)
                        for i in range(first, first + PROBLEMS_PER_DOCUMENT))


def documents(count):
    """Texts of documents 0..count-1."""
    return [document(i) for i in range(count)]
