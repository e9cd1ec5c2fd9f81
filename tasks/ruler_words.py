"""Word lists of the RULER-style tasks (tasks/ruler.py), written for this project.

RULER draws its needle keys (adjective-noun pairs) and its common-words lists from the ``wonderwords`` package;
fot keeps no such dependency, so these lists stand in for it: common, lowercase English words, one token or two
for most tokenizers, none of them a number word (a number word in a key would look like an answer). Keys are
``adjective-noun`` pairs (``KEY_WORDS``); the common-words task draws single words (``SINGLE_WORDS``).
"""

from __future__ import annotations

ADJECTIVES = tuple("""
able absent acid active actual aged alert alive amber ample ancient angry annual anxious arctic ashen awake
awful bare basic bitter blank bleak blind blond bold bored brave brief bright brisk broad broken bronze brown
busy calm capable careful casual cheap chief chilly civil clean clear clever close cloudy coarse cold common
cool copper cosmic costly cozy crisp crowded cruel curious curly damp dark dear decent deep dense dim direct
dizzy double dry dull dusty eager early easy elder elegant empty equal even exact faint fair false famous
fancy fast fatal fertile fierce final fine firm flat fond foolish formal fragile frank free fresh friendly
frozen full funny gentle giant gifted glad golden good graceful grand grateful great greedy green grey gritty
handy happy hard harsh hasty heavy helpful hidden high hollow honest hot huge humble hungry icy ideal idle
inner jolly junior keen kind large late lazy lean legal level light likely linear little lively local lone
long loose loud lovely loyal lucky lunar magic major marine mature meek mellow mental merry mighty mild minor
misty modern modest moist moral muddy narrow nasty native near neat nervous new nice noble noisy normal novel
odd old open orange outer pale patient perfect plain pleasant plump polite poor proud public purple quick
quiet rapid rare raw ready real regular remote rich rigid ripe rough round royal rural rusty sacred sad safe
salty scarlet secret senior serene severe shallow sharp shiny short shy silent silky silver simple sleepy slim
slow small smart smooth snowy soft solar solid sore sour spare spicy splendid stable stale steady steep sticky
stiff still stormy strange strict strong sturdy subtle sudden sunny super sweet swift tall tame tender thick
thin tidy tight tiny tired tough tranquil true twin ugly unique upper urban useful vacant vague valid vast
velvet violet vital vivid warm wary weak wealthy weary wet white whole wide wild windy wise witty wooden young
zealous
""".split())

NOUNS = tuple("""
acorn actor advice album alley anchor angle ankle answer apple apron arch arena armor arrow artist atlas attic
autumn avenue badge bakery balcony ballet bamboo banana bandit banner barn barrel basket battery beach beacon
beard beetle bell belt bench berry bicycle blanket blossom board boat bonnet boot border bottle boulder bowl
bracelet branch bread breeze brick bridge brook broom bucket buffalo bugle bundle butter button cabin cable
cactus camel camera canal candle cannon canoe canvas canyon captain carpet carrot castle cellar cement chair
chalk channel chapel cherry chess chest chimney circus citizen clay cliff clock cloud clover coast cobweb
coffee collar comet compass concert copper coral corner cottage cotton council country cousin cradle crane
crater crayon creek cricket crown crystal cupboard curtain cushion dagger daisy dancer desert diamond dinner
doctor dolphin donkey dragon drawer dream drum eagle earth echo elbow elephant emerald engine envelope falcon
farmer feather fence ferry festival fiddle field finger forest fossil fountain fox frog galaxy garden garlic
gate giraffe glacier glove goose gourd granite grape grass guitar hammer harbor harvest hazel helmet herald
heron hill hive honey horizon horse hotel island ivory jacket jaguar jelly jewel journey jungle kettle kitten
ladder lagoon lake lamp lantern leaf lemon letter library lighthouse lily lion lizard lobster locket magnet
mango maple marble market meadow melody mermaid meteor mirror monk monkey moon mountain museum mushroom needle
nest noodle oak oasis ocean olive onion orchard orchid otter owl oyster paddle palace panda paper parade parrot
pasture peach peacock pearl pebble pencil pepper piano picnic pillow pilot pine pirate planet plate plum pocket
poet pond poppy potato prairie prism pumpkin puppet puzzle quarry quill rabbit radio rainbow raven reef ribbon
river robin rocket rope rose saddle sailor salmon sandal satchel saucer scarf school scroll shadow shell
shepherd shovel signal silk sister skate sled slipper snail sparrow spider spoon squirrel stable stadium star
statue steeple stone storm stove street sugar summit sunset swan sweater sword table tablet teacher teapot
temple tent thistle thunder ticket tiger timber toast tomato tower tractor trail train treasure trumpet tulip
tunnel turtle umbrella valley vase velvet village violin volcano wagon walnut wand warden water whale wheat
wheel whistle willow window winter wizard wolf yacht yarn zebra
""".split())

VERBS = tuple("""
accept admire adopt advise agree allow amuse answer appear argue arrive ask attach avoid bake balance bathe
beg behave believe belong bless blink boil borrow bounce breathe brush build bury calculate call camp carry
carve catch cause change charge chase cheer chew choose clap clean climb collect comb compare complain count
cover crawl create cross crush cry cycle dance decide deliver depend describe deserve destroy develop dig
discover divide drag draw dress drift drink drive drop dust earn educate embrace employ enjoy enter escape
examine exist expand explain explore fasten fetch fill find fix float flow fold follow forgive gather glow
grab greet grin grow guard guess guide hang harm hatch heal help hover hug hum hunt hurry identify ignore
imagine improve include inform inspect invent invite jog join juggle jump kneel knit knock label land laugh
launch learn lend lift listen load lock march mend milk mix move nod notice obey offer open order pack paint
paddle pause peel perform permit pinch plant play plead point polish pour praise pray prefer prepare press
print promise protect pull pump punch push question race rain raise reach read relax remain remember repair
repeat reply rescue rest return rhyme rinse roll rush sail scatter scrub search settle sew shake share shine
shiver shout sing sketch skip slide smile sneeze solve sort spark spill spin spray sprout squeeze stamp stare
steer stir stitch stretch stroll study succeed suggest supply surprise swim swing talk taste teach tease thank
thrive tickle travel trust tumble twist unite unlock unpack vanish visit wander warn wash watch wave weave
whisper wink wish wobble wonder worry wrap write yawn yell zoom
""".split())

# Keys: every adjective-noun pair, as RULER's f"{adj}-{noun}" over wonderwords' lists.
KEY_WORDS = tuple(f"{adj}-{noun}" for adj in ADJECTIVES for noun in NOUNS)
# The common-words task: each word once (a word in two lists, e.g. "answer", is kept once), sorted.
SINGLE_WORDS = tuple(sorted(set(ADJECTIVES) | set(NOUNS) | set(VERBS)))
